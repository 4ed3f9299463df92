"""User-facing errors: one line that names what is wrong, a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys

# errors that mean "this output cannot be written": a full disk, a quota, a read-only or unwritable folder
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


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


class OutputError(UserError):
    """An output that cannot be written (full disk, read-only or unwritable folder); names the path."""


class RunDirRefused(UserError):
    """The run directory belongs to another run (a live one, or one of another config): this run may not
    write there, and records nothing there either."""


class RunDirInUse(RunDirRefused):
    """The run directory is held by another run (its lock file names the holder). Nothing is written."""


def write_error_reason(exc: OSError) -> str:
    """`No space left on device (disk full)`, `Read-only file system`, ..."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return reason + (" (disk full)" if exc.errno == errno.ENOSPC else "")


def find_write_error(exc: BaseException | None) -> OSError | None:
    """The OSError of a full disk or an unwritable folder behind `exc` (itself, or what caused it: Hydra and
    OmegaConf wrap the errors of a resolver), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def output_error(exc: OSError, path=None) -> OutputError:
    target = path if path is not None else (exc.filename or "an output file")
    return OutputError(f"could not write {target}: {write_error_reason(exc)}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: <prog>: <what is wrong> (--help lists the
    options)` and exit status 2, in place of argparse's usage lines before its message."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (--help lists the options)", file=sys.stderr, flush=True)
        sys.exit(2)


def report_and_exit(exc: BaseException, code: int | None = None):
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(code if code is not None else getattr(exc, "exit_code", 2))


def cli(fn):
    """Decorate a command-line entry point: a UserError becomes `error: <message>` and exit code 2, and so
    does a full disk or an unwritable output (`error: could not write <path>: <reason>`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            report_and_exit(exc)
        except OSError as exc:
            cause = find_write_error(exc)
            if cause is None:
                raise
            if cause.errno in (errno.EACCES, errno.EPERM):  # reading or writing: say no more than we know
                report_and_exit(
                    UserError(f"cannot access {cause.filename or 'a file'}: {write_error_reason(cause)}")
                )
            report_and_exit(output_error(cause))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
