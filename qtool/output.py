"""One output sink for every command: results on stdout, logs and progress on stderr.

Modes: human (rich tables on stdout, logs and progress bars on stderr), ``--json`` (one JSON
document on stdout, no progress), ``-q`` (results only, no logs or progress), ``-v`` (debug logs).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


@dataclass
class Output:
    json_mode: bool = False
    verbosity: int = 0  # -1 quiet, 0 normal, 1+ verbose
    # Tables keep their shape in pipes and logs: 120 columns when stdout is not a terminal.
    stdout: Console = field(
        default_factory=lambda: Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
    )
    stderr: Console = field(default_factory=lambda: Console(file=sys.stderr, soft_wrap=True))

    # --- logs (stderr) -------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if self.verbosity >= 0 and not self.json_mode:
            self.stderr.print(message, highlight=False)

    def debug(self, message: str) -> None:
        if self.verbosity >= 1:
            self.stderr.print(f"[dim]{message}[/dim]", highlight=False)

    def warn(self, message: str) -> None:
        if self.verbosity >= 0:
            self.stderr.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    # --- results (stdout) ----------------------------------------------------------------------
    def result(self, data: dict[str, Any], render: Any = None) -> None:
        """Print a command's result: ``data`` as JSON in --json mode, else ``render`` (a rich
        renderable or a callable taking the stdout console)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(jsonable(data), indent=2) + "\n")
            sys.stdout.flush()
        elif callable(render):
            render(self.stdout)
        elif render is not None:
            self.stdout.print(render)

    # --- progress (stderr, humans only) --------------------------------------------------------
    @property
    def show_progress(self) -> bool:
        return not self.json_mode and self.verbosity >= 0

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        """A rich progress display with ETA on stderr; disabled in --json and -q modes."""
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.stderr,
            disable=not self.show_progress,
            transient=False,
        )
        with bar:
            yield bar

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        with self.progress() as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


_current = Output()


def get_output() -> Output:
    return _current


def set_output(out: Output) -> None:
    global _current
    _current = out
