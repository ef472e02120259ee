"""What a damaged checkpoint file raises, and an exception as words for its one line: shared by the checks
(`integrity.py`) and the loaders (`formats.py`, `shards.py`), which the checks call for what only loading shows."""

from __future__ import annotations


class Damaged(Exception):
    """A checkpoint file is missing, cut short or unreadable: `file` (relative to the checkpoint) and why."""

    def __init__(self, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


def reason(e: BaseException) -> str:
    """An exception as a short phrase for one line: its type and the telling part of its message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # torch's weights-only refusal opens with paragraphs of advice; the cause is on a later line.
    telling = next((line for line in lines if line.startswith(("Unsupported", "WeightsUnpickler error: U"))), None)
    text = (telling or (lines[0] if lines else "")).split(". ")[0]  # the first sentence: torch adds advice after it
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
