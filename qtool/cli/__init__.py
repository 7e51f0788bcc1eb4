"""The ``qtool`` command line. ``main`` is the console entry point: it is kept light (the
command modules import torch and friends only when a command runs) and it turns Ctrl-C at any
moment, start-up included, into one line and exit code 130."""

from __future__ import annotations

import os
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
        if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):  # a torchrun worker
            from qtool.cli.launch import worker_failed

            if not worker_failed(e, "interrupted", 130):
                sys.exit(130)
        sys.stderr.write("error: interrupted\n")
        if argv is None:
            # The process ends here, its cleanup (temporary files) done while the interrupt
            # unwound. Ending now, without the interpreter's shutdown, keeps one more
            # interrupt swallowed during start-up imports and delivered again from a finalizer
            # from ending the process by the signal (exit -2 instead of 130).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(130)
