"""Atomic output: write to a temporary name beside the target, then rename.

A crash, a full disk or Ctrl-C leaves either the old file or no file, never half of one.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from qtool.errors import BadInputError, OutputError


def check_writable(path: Path) -> None:
    """Fail early, before any work, if ``path`` cannot be created."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise BadInputError(f"{path}: the folder {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"{path}: {parent} is not writable", hint="choose another output path")
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder; give a file name")


@contextmanager
def atomic_output(path: Path | str, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path``; rename it over ``path`` on success only."""
    path = Path(path).expanduser()
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise OutputError(
                f"{path}: no space left on device", hint="free space and retry"
            ) from e
        raise OutputError(f"{path}: could not write ({e.strerror or e})") from e
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
