"""The ``qtool`` command line. ``main`` is the console entry point: it is kept light (the
command modules import torch and friends only when a command runs) and it turns Ctrl-C at any
moment, start-up included, into one line and exit code 130."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from qtool import interrupt

    try:
        interrupt.install()
        from qtool.cli.app import run

        try:
            run(argv)
        except SystemExit as done:
            interrupt.check()  # an interrupt swallowed where it could not propagate
            if argv is None:  # the process ends here: a late Ctrl-C must not kill it mid-exit
                interrupt.ignore()
            raise done from None
        interrupt.check()
        if argv is None:
            interrupt.ignore()
    except KeyboardInterrupt as e:
        # a second Ctrl-C (or a swallowed one delivered again) must not cut this line short
        # or end the process by the signal instead of the exit code
        interrupt.ignore()
        from qtool.cli.launch import worker_failed  # light: no torch

        if worker_failed(e, "interrupted", 130):  # False: a torchrun rank that must not print
            sys.stderr.write("error: interrupted\n")
        sys.exit(130)
