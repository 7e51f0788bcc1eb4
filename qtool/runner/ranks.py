"""torchrun's environment, read without importing torch (the CLI decides early how a rank
prints). The distributed machinery itself is :mod:`qtool.runner.dist`."""

from __future__ import annotations

import os

LAUNCHER_ENV = "QTOOL_LAUNCHER"  # set by --nproc: a folder; the launcher prints the error line
DIE_ENV = "QTOOL_TEST_DIE"  # "RANK:LAYER": that rank kills itself at that layer (tests)


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launched() -> bool:
    """Started by torchrun (or the same environment) in a world of more than one process."""
    return world_size() > 1


def under_launcher() -> bool:
    """Started by ``qtool ... --nproc N``, whose launcher prints the run's one error line."""
    return launched() and bool(os.environ.get(LAUNCHER_ENV))
