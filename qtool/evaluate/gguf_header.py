"""GGUF checkpoints for eval, through the fast header reader in :mod:`qtool.gguf_meta`."""

from __future__ import annotations

from pathlib import Path

from qtool.checkpoint import Checkpoint, config_from_gguf
from qtool.gguf_meta import read_gguf as read_gguf_header

__all__ = ["open_gguf", "read_gguf_header"]


def open_gguf(src: str, path: Path) -> Checkpoint:
    """A GGUF Checkpoint as ``open_checkpoint`` builds it."""
    metadata, tensors = read_gguf_header(path)
    return Checkpoint(
        src,
        "gguf",
        path.parent,
        config_from_gguf(metadata, tensors),
        tensors,
        files=[path],
        gguf_path=path,
        gguf_metadata=metadata,
    )
