"""What every `mta` command shares: the two consoles, and one way to report a failure.

Results go to stdout; progress, logs and errors to stderr. A failure the user can fix (bad data, a damaged
cache, a missing model, an unwritable path, a full disk) is one line that names the file or option, the
cause and what to do, and exits 1; `mta --debug ...` adds the traceback.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager

import typer
from rich.console import Console

from mta_cli import distributed
from mta_cli.cache.store import CacheError
from mta_cli.models import ModelLoadError
from mta_cli.records import DataError
from mta_cli.segment import SegmentationError

out = Console()
err = Console(stderr=True)
USER_ERRORS = (DataError, CacheError, ModelLoadError, SegmentationError, ValueError, FileNotFoundError)
debug = False  # set per invocation by `mta --debug`: errors then show their traceback

OS_ADVICE = {
    errno.ENOSPC: "free some space, then re-run the same command (it resumes where it stopped)",
    errno.EDQUOT: "free some space, then re-run the same command (it resumes where it stopped)",
    errno.EACCES: "choose a location you can write to, or fix its permissions",
    errno.EPERM: "choose a location you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file is needed: choose a file name",
    errno.ENOENT: "check the path",
    errno.EEXIST: "the path exists already: choose another one",
}


def os_error_message(error: OSError) -> str:
    """'PATH: cause; what to do' for an operating-system error."""
    where = error.filename or "a file operation"
    cause = error.strerror or str(error)
    advice = OS_ADVICE.get(error.errno, "")
    return f"{where}: {cause}" + (f"; {advice}" if advice else "")


def fail(message: str) -> typer.Exit:
    """Print `message` as the error line (under torchrun prefixed with the rank that failed); exit code 1."""
    ranks = distributed.launched()
    where = f"[rank {ranks.rank}] " if ranks.distributed else ""
    err.print(f"error: {where}{message}", style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(1)


@contextmanager
def reported_errors(extra: tuple[type[BaseException], ...] = ()):
    """Turn the errors a user can act on into one line on stderr and exit code 1 (traceback with --debug).

    Under torchrun a rank that failed says why; of the ranks stopped by its failure only rank 0 repeats it."""
    try:
        yield
    except distributed.RankFailed as e:
        if distributed.launched().main:
            raise fail(str(e)) from e
        raise typer.Exit(1) from e
    except (*USER_ERRORS, *extra) as e:
        if debug:
            err.print_exception()
        raise fail(str(e)) from e
    except OSError as e:
        if debug:
            err.print_exception()
        raise fail(os_error_message(e)) from e
