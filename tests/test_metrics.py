"""Throughput counts training time only."""

from __future__ import annotations

import time

from launcher.metrics import Throughput


def test_time_paused_for_evaluation_stays_out_of_the_rates():
    throughput = Throughput()
    throughput.add(samples=100, tokens=0)
    time.sleep(0.02)  # training
    with throughput.paused():
        time.sleep(0.3)  # evaluating
    rate = throughput.rates()["throughput/samples_per_s"]
    assert rate > 1000  # 100 samples in about 0.02 s, not in 0.32 s (about 310/s)
