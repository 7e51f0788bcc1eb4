"""Peak RSS of a command, measured without its parent's memory in it (benchmarks and the tests'
memory caps).

``wait4``'s ``ru_maxrss`` for a child is not the child's own: at ``exec`` Linux records the
high-water mark of the memory the process had until then, and a child made by ``vfork`` (as
Python's ``subprocess`` makes them) had its parent's. A test session or a benchmark that built
a checkpoint in memory before starting qtool saw its own peak reported as qtool's (a 0.8 GiB
``qtool calibrate`` measured at 4.71 GiB after a test had built a 2 GB model in the pytest
process). So the command is started by a small Python parent of its own, which reports its
child's ``ru_maxrss``: the only memory that parent adds is its own few MiB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# runs the command, then writes "exit code, wall seconds, peak RSS in bytes" to argv[1]
_PARENT = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "wall = time.perf_counter() - t\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "open(sys.argv[1], 'w').write(f'{rc} {wall} {peak}')\n"
)


class Measured:
    """``cmd`` run under the measuring parent: start :attr:`argv` as you would ``cmd`` (it keeps
    ``cmd``'s standard streams and exit code), then read :meth:`result`."""

    def __init__(self, cmd: list[str]) -> None:
        fd, self._path = tempfile.mkstemp(prefix="qtool-peak-")
        os.close(fd)
        self.cmd = cmd
        self.argv = [sys.executable, "-c", _PARENT, self._path, *cmd]

    def result(self) -> tuple[int, float, int]:
        """Exit code (negative: the signal that ended it), wall seconds, peak RSS in bytes."""
        try:
            fields = Path(self._path).read_text().split()
        finally:
            os.unlink(self._path)
        if len(fields) != 3:
            raise RuntimeError(f"the measuring parent of {self.cmd[:3]} reported nothing")
        return int(fields[0]), float(fields[1]), int(fields[2])


def run_peak(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
) -> tuple[int, float, int]:
    """Run ``cmd`` (its output to ``stdout``/``stderr``, as ``subprocess`` takes them); return
    its exit code (negative: the signal that ended it), wall seconds and peak RSS in bytes."""
    m = Measured(cmd)
    subprocess.run(m.argv, env=env, stdout=stdout, stderr=stderr, check=False)
    return m.result()


def run_captured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str, str]:
    """Run ``cmd`` to completion with its output captured: wall seconds, peak RSS in bytes (the
    command's own, :func:`run_peak`), stdout, stderr. A failed command ends the benchmark with
    its stderr's tail."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rc, wall, peak = run_peak(cmd, env=env, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return wall, peak, stdout, stderr


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """The shortest of ``repeat`` timed calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
