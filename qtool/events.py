"""How library code reports: logs and progress go to a :class:`Reporter`, never to a stream.

The CLI passes a reporter that draws progress bars with an ETA and prints logs on stderr; the
Python API's default is silent, or turns every event into a plain dict for a callback::

    qtool.api.quantize(src, recipe, on_event=lambda e: print(e))
    # {'event': 'log', 'level': 'info', 'message': 'calibrating on canterbury ...'}
    # {'event': 'stage', 'name': 'layer 3', 'index': 4, 'total': 32, 'batches': 128}
    # {'event': 'advance', 'task': 'writing out.gguf', 'completed': 1234, 'total': 99999}

Two kinds of progress: *stages* (the embedding pass, each decoder layer, the final norm: what
layer-by-layer work goes through, with batches inside each stage) and *tasks* (a count of items
or bytes, e.g. tensors written).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class Task:
    """A counted piece of work (items or bytes)."""

    def __init__(self, reporter: Reporter, description: str, total: float | None) -> None:
        self.reporter = reporter
        self.description = description
        self.total = total
        self.completed = 0.0

    def advance(self, n: float = 1) -> None:
        self.completed += n
        self.reporter.on_advance(self)


class Reporter:
    """The callbacks. Subclasses override what they render; every method is a no-op here."""

    # -- logs --------------------------------------------------------------------------------
    def log(self, level: str, message: str) -> None:
        """``level``: "info", "warning" or "debug"."""

    def info(self, message: str) -> None:
        self.log("info", message)

    def warn(self, message: str) -> None:
        self.log("warning", message)

    def debug(self, message: str) -> None:
        self.log("debug", message)

    # -- stages (layer by layer) --------------------------------------------------------------
    def stage(self, name: str, index: int, total: int, batches: int) -> None:
        """A stage starts: ``name`` is "embeddings", "layer i" or "norm"."""

    def batch(self) -> None:
        """One batch of the current stage is done."""

    def stage_done(self, name: str, seconds: float) -> None:
        """The current stage is done."""

    # -- tasks -------------------------------------------------------------------------------
    def task(self, description: str, total: float | None = None) -> Task:
        t = Task(self, description, total)
        self.on_task(t)
        return t

    def on_task(self, task: Task) -> None:
        """A task starts."""

    def on_advance(self, task: Task) -> None:
        """A task advanced."""

    def done(self, task: Task) -> None:
        """A task ended."""

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        task = self.task(description, total)
        try:
            for item in items:
                yield item
                task.advance()
        finally:
            self.done(task)


SILENT = Reporter()


class CallbackReporter(Reporter):
    """Every event as a dict passed to ``fn`` (the API's ``on_event``)."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def log(self, level: str, message: str) -> None:
        self.fn({"event": "log", "level": level, "message": message})

    def stage(self, name: str, index: int, total: int, batches: int) -> None:
        self.fn(
            {"event": "stage", "name": name, "index": index, "total": total, "batches": batches}
        )

    def stage_done(self, name: str, seconds: float) -> None:
        self.fn({"event": "stage_done", "name": name, "seconds": seconds})

    def on_advance(self, task: Task) -> None:
        self.fn(
            {
                "event": "advance",
                "task": task.description,
                "completed": task.completed,
                "total": task.total,
            }
        )


def as_reporter(
    reporter: Reporter | None = None, on_event: Callable[[dict[str, Any]], None] | None = None
) -> Reporter:
    if reporter is not None:
        return reporter
    return CallbackReporter(on_event) if on_event is not None else SILENT


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load progress bars, notes and warnings silenced: they would mix with
    qtool's stderr, where only the :class:`Reporter` writes."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
