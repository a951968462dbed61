"""Progress bars for long commands (``broker dead replay`` of many entries, ``broker publish``
of a large file on stdin), on stderr and only on a terminal (the callers decide when).

Drawn with ``rich`` (the ``top`` extra) when it is installed, else with click's own bar: the
command works the same either way.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import click

__all__ = ["progress"]


@contextlib.contextmanager
def progress(
    total: int, label: str, *, file: IO[str] | None = None, bytes_: bool = False
) -> Iterator[Callable[[int], None]]:
    """A bar from 0 to ``total``; yields ``advance(n)``. ``bytes_``: ``total`` counts bytes
    (shown as sizes and a transfer rate), else items."""
    out: Any = file if file is not None else sys.stderr
    try:
        from rich import progress as rp
        from rich.console import Console
    except ImportError:
        with click.progressbar(length=total, label=label, file=out) as bar:
            yield bar.update
        return
    columns: list[Any] = [
        rp.TextColumn("[bold]{task.description}"),
        rp.BarColumn(),
        rp.TaskProgressColumn(),
        rp.DownloadColumn() if bytes_ else rp.MofNCompleteColumn(),
        *([rp.TransferSpeedColumn()] if bytes_ else []),
        rp.TimeRemainingColumn(),
    ]
    console = Console(file=out, force_terminal=True) if file is not None else Console(stderr=True)
    with rp.Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
