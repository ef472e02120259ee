"""A model for the FLOP counter's figures (bench/speed.py): the built-in GPT without its FLOPs formula, so that the
launcher counts its first update's FLOPs with torch's counter instead (`_component_: bench.models.CountedGPT`)."""

from __future__ import annotations

from launcher.models.gpt import GPT


class CountedGPT(GPT):
    flops_per_token = None  # no formula: launcher.flops.FlopMeter counts the first update
