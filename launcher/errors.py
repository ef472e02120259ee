"""The one error type users see: a list of problems with their input, each one line."""

from __future__ import annotations


class RecipeError(Exception):
    """Bad input, found before anything is built.

    Each problem is a complete line that names the file, the key path and what was expected, so the CLI can print
    them as they are and exit 2 without a traceback.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
