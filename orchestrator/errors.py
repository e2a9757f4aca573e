"""Errors the command line turns into exit codes (docs/design.md#exit-codes)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad usage, config or input: the message names the file, field and reason; exit 2."""

    exit_code = 2

    def __init__(self, *messages: str) -> None:
        super().__init__("\n".join(messages))
        self.messages = list(messages)
