"""The CLI's one output sink: results on stdout, logs and progress on stderr.

Modes: human (rich tables on stdout, logs and progress bars on stderr), ``--json`` (one JSON
document on stdout, no progress), ``-q`` (results only, no logs or progress), ``-v`` (debug logs).
:class:`CLIReporter` renders the library's events (:mod:`qtool.events`) through it: progress
bars with an ETA on a terminal, one line per stage with the ETA elsewhere (logs, CI).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qtool.events import Reporter, Task
from qtool.runner import ranks


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
            self.stderr.print(message, highlight=False, markup=False)

    def debug(self, message: str) -> None:
        if self.verbosity >= 1:
            self.stderr.print(message, style="dim", highlight=False, markup=False)

    def warn(self, message: str) -> None:
        if self.verbosity >= 0:
            self.stderr.print("[yellow]warning:[/yellow] ", end="", highlight=False)
            self.stderr.print(message, highlight=False, markup=False)

    # --- results (stdout) ----------------------------------------------------------------------
    def result(self, data: dict[str, Any], render: Any = None) -> None:
        """Print a command's result: ``data`` as JSON in --json mode, else ``render`` (a rich
        renderable or a callable taking the stdout console)."""
        if ranks.launched() and ranks.rank() != 0:
            return  # torchrun: rank 0 prints the run's result
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

    @property
    def live(self) -> bool:
        """Animated bars: a terminal on stderr and progress shown."""
        return self.show_progress and self.stderr.is_terminal

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
            disable=not self.live,
            transient=False,
        )
        with bar:
            yield bar


class CLIReporter(Reporter):
    """The library's events on stderr: logs by verbosity; on a terminal, a bar over the stages
    (embeddings, each layer, norm) with the overall ETA, a bar for the current stage's batches
    and one per task; elsewhere one line per stage with its time and the ETA."""

    def __init__(self, out: Output, bar: Progress | None) -> None:
        self.out = out
        self.bar = bar
        self.total_task: Any = None
        self.stage_task: Any = None
        self.t0 = time.perf_counter()
        self.done_stages = 0
        self.total = 0
        self._ids: dict[int, Any] = {}

    def log(self, level: str, message: str) -> None:
        {"warning": self.out.warn, "debug": self.out.debug}.get(level, self.out.info)(message)

    def stage(self, name: str, index: int, total: int, batches: int) -> None:
        self.total = total
        if self.bar is None:
            return
        if self.total_task is None:
            self.total_task = self.bar.add_task("layers", total=total)
        if self.stage_task is None:
            self.stage_task = self.bar.add_task(name, total=batches)
        else:
            self.bar.reset(self.stage_task, total=batches, description=name)

    def batch(self) -> None:
        if self.bar is not None and self.stage_task is not None:
            self.bar.advance(self.stage_task)

    def stage_done(self, name: str, seconds: float) -> None:
        self.done_stages += 1
        if self.bar is not None:
            if self.total_task is not None:
                self.bar.advance(self.total_task)
            self.out.debug(f"{name}: {seconds:.2f} s")
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done_stages * max(0, self.total - self.done_stages)
        self.out.info(f"{name}: {seconds:.1f} s [{self.done_stages}/{self.total}, eta {eta:.0f} s]")

    def on_task(self, task: Task) -> None:
        if self.bar is not None:
            self._ids[id(task)] = self.bar.add_task(task.description, total=task.total)

    def on_advance(self, task: Task) -> None:
        tid = self._ids.get(id(task))
        if tid is not None and self.bar is not None:
            self.bar.update(tid, completed=task.completed)

    def done(self, task: Task) -> None:
        self._ids.pop(id(task), None)


@contextmanager
def reporter(out: Output) -> Iterator[CLIReporter]:
    """A :class:`CLIReporter` for the duration of a command (bars only on a terminal)."""
    if out.live:
        with out.progress() as bar:
            yield CLIReporter(out, bar)
    else:
        yield CLIReporter(out, None)


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
