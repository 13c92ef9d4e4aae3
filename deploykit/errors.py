"""The one exception type for user mistakes.

The CLI turns a :class:`UserError` into a single line on stderr naming the file and the
fix, and exits with code 2 (no traceback). Library code raises it at the boundary where a
user-supplied thing (file, name, option) is found to be wrong; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_ACCEPTANCE_FAILED = 1     # a release gate: a threshold was missed (run, verify, device-verify)


class UserError(Exception):
    """Bad input: a file that is missing or unreadable, a wrong name, an unknown option."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.message = message.strip().rstrip(".")
        self.path = str(path) if path is not None else None
        self.fix = fix.strip().rstrip(".") if fix else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(self.message)
        if self.fix:
            parts.append(f"; fix: {self.fix}")
        # A single line whatever the inner messages contained.
        return " ".join("".join(parts).split())
