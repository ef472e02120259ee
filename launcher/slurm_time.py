"""SLURM's wall-time formats and limits, for the recipe's checks and for `launcher slurm submit` alike."""

from __future__ import annotations

import re

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
TIME_FORMATS = "HH:MM:SS, MM:SS, MM or D-HH:MM:SS"
MAX_SIGNAL_TIME_S = 65535  # the most seconds before its end that SLURM can warn a job (--signal=...@time)


def parse_time(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; ValueError otherwise."""
    match = _TIME.match(text.strip())
    if not match or text.strip() != text or not text:
        raise ValueError(text)
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = [*parts, 0, 0][:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60  # MM
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]  # MM:SS
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]
