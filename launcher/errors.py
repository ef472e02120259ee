"""The one error type users see: a list of problems with their input, each one line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class RecipeError(Exception):
    """Bad input, found before anything is built.

    Each problem is a complete line that names the file, the key path and what was expected, so the CLI can print
    them as they are and exit 2 without a traceback.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RunFailed(Exception):
    """A run that started but cannot go on: lost a peer, diverged, or was launched in a way that cannot work.

    Every rank raises it; `message` is what this rank prints (empty where the main process speaks for all).
    """

    def __init__(self, message: str, exit_code: int = 1):
        self.message = message
        self.exit_code = exit_code
        super().__init__(message)


def say(line: str) -> None:
    """Print one line to stderr in a single write.

    `print` writes the text and its newline separately; with PYTHONUNBUFFERED (common under SLURM and in CI) those
    are two writes, and two ranks refusing the same recipe at once interleave into one garbled line.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Throttled:
    """Lines of one kind, at most one every `every_s` seconds: a warning that can repeat at every step (a skipped
    update) is said when it happens, without flooding the log; a line after a quiet spell counts those held back."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self.last: float | None = None
        self.held_back = 0

    def say(self, line: str, write: Callable[[str], None] = say) -> bool:
        """Say `line` unless one was said less than `every_s` ago; True if it was said."""
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            self.held_back += 1
            return False
        if self.held_back:
            line += f" (and {self.held_back} more like it since the last such line)"
        write(line)
        self.last, self.held_back = now, 0
        return True
