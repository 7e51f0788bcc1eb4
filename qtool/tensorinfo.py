"""Where one stored tensor's bytes are: the index entry both checkpoint readers make (the
safetensors header reader in :mod:`qtool.checkpoint`, the GGUF one in :mod:`qtool.gguf_meta`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored: name, shape (PyTorch order), dtype name, bytes, file and offset."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype ("BF16") or GGUF type name ("Q4_K")
    nbytes: int
    file: Path
    offset: int = 0  # absolute offset of the data in ``file``

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n
