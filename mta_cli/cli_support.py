"""What every `mta` command shares: the two consoles, one way to report a failure, figures as a table or JSON.

Results go to stdout; progress, logs and errors to stderr. A failure the user can fix (bad data, a damaged
cache, a missing model, an unwritable path, a full disk) is one line that names the file or option, the
cause and what to do, and exits 1; `mta --debug ...` adds the traceback.
"""

from __future__ import annotations

import errno
import json
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

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


def print_figures(figures: dict, as_json: bool, title: str) -> None:
    """Figures as JSON (for pipelines) or as a two-column table."""
    if as_json:
        out.print_json(json.dumps(figures))
        return
    table = Table(title=title, show_header=False)
    for key, value in figures.items():
        table.add_row(key, format_figure(value, key))
    out.print(table)


def format_figure(value, key: str = "") -> str:
    """Floats with 3 decimals, or 3 significant digits when small (a learning rate): 2.50e-06, not 0.000; a
    byte count with its size in MiB or GiB as well."""
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 0.01 else f"{value:,.3f}"
    if type(value) is int and "bytes" in key and "per_token" not in key:
        size = f"{value / 2**30:,.2f} GiB" if value >= 2**30 else f"{value / 2**20:,.1f} MiB"
        return f"{value:,} ({size})"
    return str(value)


def parse_ints(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None


class EventProgress:
    """A rich progress display on stderr, quiet when stderr is not a terminal, fed by a library function's
    `progress(event, info)` events: `with Sub() as on_event: run(..., progress=on_event)`.

    A "status" event (what is loading) is printed as a dim line; a subclass gives its `columns()` and handles
    the other events in `handle`. Under torchrun only rank 0 draws."""

    def columns(self) -> tuple:
        raise NotImplementedError

    def __enter__(self):
        self.shown = err.is_terminal and distributed.launched().main
        self.progress = Progress(*self.columns(), console=err, disable=not self.shown)
        self.progress.__enter__()
        self.task = None
        return self.on_event

    def on_event(self, event: str, info: dict) -> None:
        if event == "status":
            self.note(f"[dim]{info['message']} ...[/dim]", markup=True)
        else:
            self.handle(event, info)

    def handle(self, event: str, info: dict) -> None:
        raise NotImplementedError

    def note(self, text: str, markup: bool = False) -> None:
        """A line above the bar, in a terminal only."""
        if self.shown:
            self.progress.console.print(text, markup=markup, highlight=False)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)
