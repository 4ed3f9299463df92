"""User-facing errors: one line that names what is wrong, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake the user can fix (bad config value, missing file, ...). The message is one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """An invalid configuration value; the message names the key."""


class DataError(UserError):
    """Missing, unreadable or unexpected data; the message names the file."""


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint; the message names the file."""


def report_and_exit(exc: BaseException, code: int | None = None):
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(code if code is not None else getattr(exc, "exit_code", 2))


def cli(fn):
    """Decorate a command-line entry point: a UserError becomes `error: <message>` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            report_and_exit(exc)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
