"""The two errors a user acts on, raised by every stage and printed as one line by its command.

* ``ConfigError``: a setting to change (a bad value, a missing option, a contradiction),
  found before any work; one error lists every bad setting at once.
* ``DataError``: the data is not what the stage needs (no such input, no manifest, no
  shards, a column missing), found when the stage reads it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more settings a user must fix; the message names each option and its value."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} settings to fix:\n  " + "\n  ".join(self.problems)
        super().__init__(message)


class DataError(RuntimeError):
    """The input data is missing or not in the shape the stage reads; the message names the path."""
