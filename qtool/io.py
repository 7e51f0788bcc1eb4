"""The one atomic writer: outputs are made under a temporary name beside the target, then renamed.

A crash, a full disk or Ctrl-C leaves either the previous output or none, never half of one.
Files (:func:`atomic_path`, :func:`atomic_file`) and folders (:func:`atomic_dir`) work the same
way; an existing output is replaced only once the new one is complete, so running the same
command twice replaces the earlier result.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from qtool import interrupt
from qtool.errors import BadInputError, OutputError, QToolError


def check_writable(path: Path | str, *, folder: bool = False) -> None:
    """Fail early, before any work, if ``path`` cannot be created. ``folder``: the output is
    a folder (an existing folder is replaced; an existing file is an error), else a file."""
    path = Path(path).expanduser()
    parent = path.resolve().parent
    if not parent.is_dir():
        raise BadInputError(f"{path}: the folder {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"{path}: {parent} is not writable", hint="choose another output path")
    if folder and path.exists() and not path.is_dir():
        raise BadInputError(f"{path}: exists and is not a folder", hint="choose a folder name")
    if not folder and path.is_dir():
        raise BadInputError(f"{path}: is a folder; give a file name")


def output_error(path: Path | str, e: OSError) -> OutputError:
    """An OSError while writing ``path`` as one line (a full disk says so)."""
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on device", hint="free space and retry")
    return OutputError(f"{path}: could not write ({e.strerror or e})")


@contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """OSErrors (and safetensors' I/O errors) while writing ``path`` as one-line OutputErrors."""
    try:
        yield
    except QToolError:
        raise
    except OSError as e:
        raise output_error(path, e) from e
    except Exception as e:  # safetensors raises its own error type for I/O failures
        if "No space left" in str(e):
            raise OutputError(
                f"{path}: no space left on device", hint="free space and retry"
            ) from e
        raise


@contextmanager
def atomic_path(path: Path | str, *, checkpoint: bool = False) -> Iterator[Path]:
    """A temporary file name beside ``path``; renamed over ``path`` if the block succeeds,
    removed otherwise. For writers that take a file name (safetensors, gguf-py).
    ``checkpoint``: a resume state, not an output: written after Ctrl-C too (to save it)."""
    path = Path(path).expanduser()
    check_writable(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with output_errors(path):
            yield tmp
            os.chmod(tmp, 0o644)  # mkstemp made it private; the output is an ordinary file
            if not checkpoint:
                interrupt.check()  # never publish an output after Ctrl-C
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(
    path: Path | str, mode: str = "wb", *, checkpoint: bool = False
) -> Iterator[BinaryIO]:
    """An open temporary file beside ``path``, flushed, synced and renamed on success."""
    with atomic_path(path, checkpoint=checkpoint) as tmp, open(tmp, mode) as f:
        yield f  # type: ignore[misc]
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_dir(path: Path | str, *, first_wins: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path``; on success it replaces ``path`` (an existing folder
    goes only after the new one is in place), on failure it is removed. ``first_wins``: a cache
    entry that several processes may make at once — when ``path`` exists by the time this one
    is complete, the existing one stays (its readers never see it go) and this one is dropped."""
    out = Path(path).expanduser().resolve()
    check_writable(out, folder=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise output_error(out, e) from e
    try:
        with output_errors(out):
            yield tmp
            interrupt.check()
            _replace_dir(tmp, out, first_wins=first_wins)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, out: Path, *, first_wins: bool = False) -> None:
    for f in tmp.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    os.chmod(tmp, 0o755)
    if first_wins:
        try:
            os.rename(tmp, out)  # fails when another process made ``out`` meanwhile
        except OSError:
            if not out.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)  # put the previous output back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_tensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_path`."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_text(path: Path | str, text: str) -> None:
    """A small text file (JSON state, YAML), atomically."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


# -- checkpoints of resumable work (GGUF export, eval) -------------------------------------------


def fsync_dir(path: Path | str) -> None:
    """Make a rename or a new file in folder ``path`` durable (a power loss keeps it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform or filesystem without directory handles: nothing more to do
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_state(path: Path | str, state: dict) -> None:
    """A resume state as JSON, durably: a temporary file synced, renamed, the folder synced.
    A crash at any moment leaves the previous state or this one. Floats round-trip exactly."""
    import json

    with atomic_file(path, checkpoint=True) as f:
        f.write(json.dumps(state, indent=1, sort_keys=True, allow_nan=True).encode("utf-8"))
    fsync_dir(Path(path).expanduser().resolve().parent)


def file_identity(path: Path | str, sample: int = 1 << 20) -> dict:
    """What identifies a source file without reading it all: its name, size, modification time
    and the SHA-256 of its first and last ``sample`` bytes (a safetensors or GGUF header and
    the end of its data)."""
    import hashlib

    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(sample))
        if st.st_size > sample:
            f.seek(max(sample, st.st_size - sample))
            h.update(f.read(sample))
    return {
        "name": p.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256_head_tail": h.hexdigest(),
    }


def first_difference(old: object, new: object, prefix: str = "") -> str:
    """The first place two identities (nested dicts/lists) differ, as ``key: old -> new``;
    empty when they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            d = first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
            if d:
                return d
        return ""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            d = first_difference(a, b, f"{prefix}{i}.")
            if d:
                return d
        return ""
    if old != new:
        return f"{prefix.rstrip('.') or 'value'}: {_short(old)} -> {_short(new)}"
    return ""


def _short(v: object, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."
