"""Ctrl-C that is never lost. Python raises KeyboardInterrupt wherever the main thread happens
to be; when that is a place that cannot propagate it (a weakref callback run by the import
system, a ``__del__``), the exception is printed as "Exception ignored" and the run goes on.
``install`` makes SIGINT also set a flag, re-raises a swallowed interrupt in the main flow, and
the atomic writer refuses to publish an output once the flag is set."""

from __future__ import annotations

import _thread
import signal
import sys
from types import FrameType

_interrupted = False


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived, even one that was swallowed."""
    if _interrupted:
        raise KeyboardInterrupt


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def ignore() -> None:
    """From now on Ctrl-C does nothing (the run is already stopping)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def install() -> None:
    """Called first thing by the command line (library users keep Python's own handling)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return  # started with Ctrl-C ignored (nohup, a background job): keep it so
    signal.signal(signal.SIGINT, _on_sigint)
    previous = sys.unraisablehook

    def hook(u: sys.UnraisableHookArgs) -> None:
        if u.exc_type is not None and issubclass(u.exc_type, KeyboardInterrupt):
            _thread.interrupt_main()  # deliver it again where it can propagate
            return
        previous(u)

    sys.unraisablehook = hook


class Stopped(BaseException):
    """SIGTERM under torchrun: the launcher stops every worker when one fails. A BaseException,
    like KeyboardInterrupt, so that cleanup (atomic writers) runs and nothing catches it."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: cleanup and exit run undisturbed
    raise Stopped


def install_sigterm() -> None:
    """Torchrun workers: SIGTERM raises :class:`Stopped` (temporary files are removed)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
