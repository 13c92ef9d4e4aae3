"""Progress bars (rich) for long work; quiet mode for tests and scripting."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_state = {"quiet": False}
console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def track(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a live progress bar on a terminal, one summary line otherwise (nothing when quiet)."""
    if _state["quiet"]:
        yield from items
        return
    if not console.is_terminal:
        start, count = time.perf_counter(), 0
        for item in items:
            yield item
            count += 1
        say(f"  {description}: {count} steps in {time.perf_counter() - start:.1f} s")
        return
    columns = (TextColumn("  [bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def say(message: str) -> None:
    if not _state["quiet"]:
        console.print(message, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    say(f"[bold cyan]▶ {name}[/]")
    yield
    sys.stderr.flush()
