"""gguf-py's GGUFReader as an independent reference for qtool's own GGUF header reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.errors import CorruptFileError
from qtool.tensorinfo import TensorInfo

GGUF_MAGIC = b"GGUF"


def gguf_py_read(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Return (metadata, tensors) of a GGUF file; tensor shapes in PyTorch order (rows first)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptFileError(f"{path}: not a GGUF file (magic {magic!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damage
        raise CorruptFileError(
            f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})",
            hint="re-download or re-export the file",
        ) from e
    size = path.stat().st_size
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except Exception:  # an exotic value type: keep going, reports skip it
            continue
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CorruptFileError(
                f"{path}: truncated GGUF file "
                f"(tensor {t.name} ends at byte {end}, file has {size})",
                hint="re-download or re-export the file",
            )
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        tensors[t.name] = TensorInfo(
            t.name, shape, t.tensor_type.name, int(t.n_bytes), path, int(t.data_offset)
        )
    return metadata, tensors
