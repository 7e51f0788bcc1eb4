"""The ``qtool`` command: wires the subcommands, global flags and error handling.

Conventions, decided once: results on stdout, logs and progress on stderr; ``--json`` for
machine-readable results; ``-v``/``-q`` before or after the command; exit codes 0 ok, 1
failure, 2 bad usage or bad input, 130 interrupted. Known errors become one ``error:`` line on
stderr; ``QTOOL_DEBUG=1`` shows the traceback. Command modules import only the CLI's own
light dependencies at module level, so ``qtool --help``, ``--version`` and a header-only
``inspect`` start without torch or transformers.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from qtool import __version__
from qtool.cli import calibrate, eval_cmd, export, inspect, launch, quantize
from qtool.errors import EXIT_BAD_INPUT, EXIT_FAILURE, QToolError
from qtool.interrupt import Stopped
from qtool.output import Output, set_output

app = typer.Typer(
    name="qtool",
    help="Model conversion toolchain for LLMs: inspect, calibrate, quantize, eval, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"qtool {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    verbose: Annotated[
        int, typer.Option("-v", "--verbose", count=True, help="More logs on stderr.")
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Results only: no logs or progress.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    set_output(Output(json_mode=json_out, verbosity=-1 if quiet else verbose))


app.command("inspect")(inspect.inspect_cmd)
app.command("calibrate")(calibrate.calibrate_cmd)
app.command("quantize")(quantize.quantize_cmd)
app.command("eval")(eval_cmd.eval_command)
app.command("export")(export.export_cmd)

# Flags that mean the same before or after the command; they are moved in front of it.
_GLOBAL = {"-q", "--quiet", "-v", "--verbose", "-vv", "-vvv"}


def hoist_global_flags(argv: list[str]) -> list[str]:
    """``qtool inspect X -q`` means ``qtool -q inspect X``: global flags after the command
    (and before a ``--``) are moved in front of it."""
    if "--" in argv:
        cut = argv.index("--")
        head, tail = argv[:cut], argv[cut:]
    else:
        head, tail = argv, []
    flags = [a for a in head if a in _GLOBAL]
    rest = [a for a in head if a not in _GLOBAL]
    return flags + rest + tail


def _message(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, Stopped):
        return "stopped by torchrun: another rank failed", 143
    if isinstance(exc, QToolError):
        return str(exc), exc.exit_code
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch/--context, or a machine with more RAM)", 1
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return f"no space left on device ({exc.filename or 'output'}): free space and retry", 1
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename} (choose a writable location)", EXIT_BAD_INPUT
    return (
        f"internal error: {type(exc).__name__}: {exc} (set QTOOL_DEBUG=1 for the traceback)",
        EXIT_FAILURE,
    )


def run(argv: list[str] | None = None) -> None:
    """Run the app, turning known exceptions into one line and an exit code."""
    args = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    launch.ARGV = list(args)
    launch.worker_setup()
    try:
        launch.check_command(args)
        code = app(args=args, standalone_mode=False, prog_name="qtool")
        _shutdown()
        if code == 130:  # Typer turns Ctrl-C (after our cleanup ran) into a return value
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - this is the one place errors are mapped
        if isinstance(exc, typer.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, typer.Abort):
            raise KeyboardInterrupt from exc  # click turns Ctrl-C into Abort
        if isinstance(exc, typer.TyperException) and hasattr(exc, "show"):
            exc.show()  # usage errors: Typer's message, exit code 2
            sys.exit(getattr(exc, "exit_code", EXIT_BAD_INPUT))
        if os.environ.get("QTOOL_DEBUG"):
            raise
        msg, code = _message(exc)
        if launch.worker_failed(exc, msg, code):
            sys.stderr.write(f"error: {msg}\n")
        sys.exit(code)
    sys.exit(0)


def _shutdown() -> None:
    """A torchrun worker leaves its process group (when it joined one)."""
    dist = sys.modules.get("qtool.runner.dist")
    if dist is not None:
        dist.world().shutdown()


def main(argv: list[str] | None = None) -> None:
    """Console entry point (kept for ``qtool.cli.app:main`` callers): see :func:`qtool.cli.main`."""
    from qtool.cli import main as entry

    entry(argv)
