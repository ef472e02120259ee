"""The benchmark harness runs (its figures are measured in bench/, never asserted here)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_the_overhead_harness_runs_and_reports_every_variant():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "overhead.py"), "--steps", "3", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| torch", "| accelerate", "| launcher"], proc.stdout
