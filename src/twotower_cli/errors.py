"""The one error type users see: a message and a hint, rendered by the CLI as `Error: …` with exit 1."""

from __future__ import annotations


class TwoTowerError(Exception):
    """A problem the user can fix. `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
