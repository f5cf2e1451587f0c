"""The one error channel of the programs: a user's mistake ends the run with exit code 2 and one line

    FATAL <kind> error: <what is wrong and what to change>

Library code raises `UserError` (or a subclass) where the fault lies in what the user gave it (a config value, a
path, a file, a data record, a workdir); `report` is called once, by the program's `main`, never per call site.
Anything else (a bug) keeps its traceback. `UserError` is a ValueError, so callers that catch ValueError (tests,
scripts) still do.

Kinds: config (a setting), model (an HF folder: weights, config.json, tokenizer), data (a prompt file or
column), workdir (the run folder), checkpoint (a saved train state), resume (a config that differs from the
checkpoint's), training (the run cannot go on, e.g. every update skipped).
"""
from __future__ import annotations

import sys

EXIT_CODE = 2


class UserError(ValueError):
    """A mistake in what the user gave the program; the message says what to change."""

    kind = "input"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class ConfigError(UserError):
    kind = "config"


class DataError(UserError):
    kind = "data"


class WorkdirError(UserError):
    kind = "workdir"


def fatal_line(kind: str, message: str) -> str:
    """The one line (newlines of a nested message folded into spaces)."""
    folded = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return f"FATAL {kind} error: {folded}\n"


def report(e: UserError) -> "NoReturn":  # noqa: F821
    """Writes `e`'s one line to stderr and exits with EXIT_CODE."""
    sys.stderr.write(fatal_line(e.kind, e.args[0] if e.args else ""))
    sys.stderr.flush()
    sys.exit(EXIT_CODE)
