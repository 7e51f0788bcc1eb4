"""Several processes from one command: ``--nproc N`` and the CLI side of torchrun workers.

``qtool quantize ... --nproc N`` re-runs the same command line (without ``--nproc``) as N
workers through torch's own launcher (``torch.distributed.run``'s elastic agent, one node,
a free local port): the agent stops the other workers as soon as one fails. The workers report
through torchrun's error files; the launcher turns the root cause into the run's one ``error:``
line (rank 0 prints nothing then), and names the folder that ``--resume`` continues from.

Under torchrun itself (``torchrun --nproc-per-node N -m qtool ...``, any number of nodes) the
same workers run: rank 0 prints progress, results and its error line; the other ranks print
nothing (their stdout and stderr go to /dev/null) and record their errors in torchrun's error
files, which torchrun's own failure report shows.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, NoReturn

from qtool.runner import ranks

ARGV: list[str] = []  # the command line being run (set by qtool.cli.app.run)


# -- workers -------------------------------------------------------------------------------------


def worker_setup() -> None:
    """A torchrun worker: SIGTERM raises (cleanup runs), ranks other than 0 are silent."""
    if not ranks.launched():
        return
    from qtool import interrupt

    interrupt.install_sigterm()
    if ranks.rank() != 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


DISTRIBUTED = ("quantize", "calibrate")  # the commands that run as several processes


def check_command(argv: list[str]) -> None:
    """Under torchrun, only the commands that share their work run (the others would do it
    once per rank, each writing the same output)."""
    if not ranks.launched():
        return
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in DISTRIBUTED:
        from qtool.errors import BadInputError

        raise BadInputError(
            f"qtool {command} does not run as several processes",
            hint="run it without torchrun (quantize and calibrate take --nproc)",
        )


def worker_failed(exc: BaseException, message: str, code: int) -> bool:
    """Record a worker's failure for torchrun (its error file); whether to print the line
    (rank 0 under plain torchrun; nobody under ``--nproc``, whose launcher prints it)."""
    if not ranks.launched():
        return True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting already: torchrun's stop is moot
    from qtool.errors import PeerError
    from qtool.interrupt import Stopped

    kind = (
        "peer"
        if isinstance(exc, PeerError)
        else "stopped"
        if isinstance(exc, Stopped)
        else "interrupted"
        if isinstance(exc, KeyboardInterrupt)
        else "own"
    )
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        line = message if ranks.rank() == 0 else f"rank {ranks.rank()}: {message}"
        record = {
            "message": {
                "message": line,
                "extraInfo": {
                    "py_callstack": traceback.format_exc(),
                    "timestamp": str(int(time.time())),
                },
            },
            "qtool": {"line": line, "code": code, "kind": kind},
        }
        try:
            with open(path, "w") as f:
                json.dump(record, f)
        except OSError:
            pass
    return ranks.rank() == 0 and not ranks.under_launcher()


# -- the launcher --------------------------------------------------------------------------------


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (before a ``--``)."""
    out: list[str] = []
    skip = False
    for k, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--":
            out.extend(argv[k:])
            break
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def relaunch_if(nproc: int) -> None:
    """``--nproc N``: relaunch as N workers (and exit) unless N is 1."""
    from qtool.errors import BadInputError

    if ranks.launched():
        raise BadInputError("--nproc inside torchrun: give one or the other")
    if nproc < 1:
        raise BadInputError(f"--nproc {nproc}: must be at least 1")
    if nproc > 1:
        relaunch(nproc)


def relaunch(nproc: int) -> NoReturn:
    """Run this command line as ``nproc`` torchrun workers on this machine; exit with the
    run's exit code (one ``error:`` line on failure)."""
    import logging

    from qtool.errors import BadInputError

    argv = strip_nproc(ARGV)
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    except ImportError as e:  # pragma: no cover - every supported torch has them
        raise BadInputError("--nproc: this torch build has no torch.distributed") from e
    for name in ("torch.distributed", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    folder = tempfile.mkdtemp(prefix="qtool-launch-")
    os.environ[ranks.LAUNCHER_ENV] = folder
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    code = 0
    try:
        elastic_launch(config, sys.executable)("-m", "qtool", *argv)
    except ChildFailedError as e:
        line, code = summarize(e, Path(folder))
        sys.stderr.write(f"error: {line}\n")
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        code = 130
    except Exception as e:  # noqa: BLE001 - the agent itself failed (rendezvous, ports)
        if type(e).__name__ == "SignalException":
            sys.stderr.write("error: interrupted\n")
            code = 130
        else:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            sys.stderr.write(f"error: --nproc {nproc}: the launcher failed ({first})\n")
            code = 1
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()
    sys.exit(code)


def summarize(e: Any, folder: Path) -> tuple[str, int]:
    """The failed run's one line and exit code, from the workers' records: a worker's own error
    (the lowest rank's), else a worker that died (killed), else what torchrun saw."""
    failures: dict[int, Any] = dict(e.failures)
    records = {
        r: (f.error_file_data or {}).get("qtool") if isinstance(f.error_file_data, dict) else None
        for r, f in failures.items()
    }
    own = {r: rec for r, rec in records.items() if rec and rec.get("kind") == "own"}
    line: str
    code = 1
    if own:
        r = min(own)
        line, code = own[r]["line"], int(own[r]["code"])
    elif any(rec and rec.get("kind") == "interrupted" for rec in records.values()):
        return "interrupted", 130
    else:
        died = sorted(
            r
            for r, f in failures.items()
            if not records.get(r) and f.exitcode != -signal.SIGTERM and f.exitcode != 0
        )
        if died:
            root = e.get_first_failure()[0]
            r = root if root in died else died[0]
            f = failures[r]
            how = (
                f"killed by {signal.Signals(-f.exitcode).name}"
                if f.exitcode < 0
                else f"exit code {f.exitcode}"
            )
            line = f"rank {r} of the --nproc run died ({how}); the other ranks were stopped"
        else:
            r, f = e.get_first_failure()
            rec = records.get(r)
            line = rec["line"] if rec else f"rank {r} failed (exit code {f.exitcode})"
    resume = folder / "resume"
    if resume.exists() and "--resume" not in line:
        work = resume.read_text().strip()
        if (Path(work) / "state.json").exists():
            line += f" (rerun with --resume {work} to continue)"
    return line, code if code in (1, 2, 130) else 1
