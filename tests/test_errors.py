"""Error lines reach stderr whole, so two ranks refusing at once do not garble each other's line."""

from __future__ import annotations

import io
import sys

import pytest

from launcher.errors import Throttled, say


class RecordingRaw(io.RawIOBase):
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.writes.append(bytes(b))
        return len(b)


def test_say_is_one_write_on_an_unbuffered_stderr(monkeypatch: pytest.MonkeyPatch):
    # What `python -u` / PYTHONUNBUFFERED gives: text written through to the raw file, no buffer between.
    raw = RecordingRaw()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, encoding="utf-8", write_through=True))  # type: ignore[arg-type]
    say("error: recipe.yaml: optimizer.lr: must be a number > 0, got a number (-1)")
    assert raw.writes == [b"error: recipe.yaml: optimizer.lr: must be a number > 0, got a number (-1)\n"]


def test_a_repeated_warning_is_said_at_most_once_per_interval_and_counts_what_it_held_back():
    now = [0.0]
    said: list[str] = []
    throttled = Throttled(every_s=10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0, 12.0, 13.0):
        now[0] = t
        throttled.say(f"at {t}", write=said.append)
    assert said == ["at 0.0", "at 12.0 (and 2 more like it since the last such line)"]
