"""The one error type users see: a list of problems with their input, each one line."""

from __future__ import annotations

import sys


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
