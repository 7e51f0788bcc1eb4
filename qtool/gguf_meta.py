"""Read a GGUF file: its metadata and tensor index in one sequential pass over its header, and
its tensors decoded exactly (:func:`read_gguf_tensor`, through qtool's codecs).

gguf-py's ``GGUFReader`` builds a numpy view per field part, which takes tens of seconds for a
262k-token vocabulary (Gemma 3); ``inspect`` and ``eval`` only need the header, so it is parsed
here following the format spec (gguf-py ``gguf/constants.py``, llama.cpp ``docs/gguf.md``):
magic, version, tensor and KV counts, the KV pairs, the tensor infos, then data aligned to
``general.alignment`` (32). The tests compare the result with gguf-py's reader on real files.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import CorruptFileError
from qtool.tensorinfo import TensorInfo

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUFValueType -> struct format of a scalar
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: bytes | memoryview, path: Path) -> None:
        self.buf = memoryview(buf)
        self.pos = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise CorruptFileError(
                f"{self.path}: truncated GGUF header (needs byte {end}, file has {len(self.buf)})",
                hint="re-download or re-export the file",
            )
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:  # keep going: a broken token string is for the checks to see
            return bytes(raw).decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub = self.scalar("I")
            n = self.scalar("Q")
            if sub == _STRING:
                return [self.string() for _ in range(n)]
            if sub in _SCALARS:
                fmt = _SCALARS[sub]
                size = struct.calcsize("<" + fmt)
                return list(struct.unpack(f"<{n}{fmt}", self.take(n * size)))
            return [self.value(sub) for _ in range(n)]  # nested arrays
        raise CorruptFileError(
            f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}",
            hint="the file is corrupt or from a newer GGUF version",
        )


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """(metadata, tensors) of a GGUF file, tensor shapes in PyTorch order (rows first)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CorruptFileError(f"{path}: not a GGUF file (bad magic)")
        f.seek(0)
        # The header sits at the front; the data section is not read. 512 MiB bounds a
        # damaged count that would claim more.
        buf = f.read(min(size, 512 << 20))
    c = _Cursor(buf, path)
    c.take(4)
    version = c.scalar("I")
    if version not in (2, 3):
        raise CorruptFileError(
            f"{path}: GGUF version {version} is not supported (2 or 3; a big-endian file "
            "reads as a huge version)",
        )
    n_tensors, n_kv = c.scalar("Q"), c.scalar("Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise CorruptFileError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.scalar("I")
        if n_dims > 8:
            raise CorruptFileError(f"{path}: tensor {name} claims {n_dims} dimensions")
        dims = [c.scalar("Q") for _ in range(n_dims)]
        ttype, offset = c.scalar("I"), c.scalar("Q")
        infos.append((name, dims, ttype, offset))
    align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (c.pos + align - 1) // align * align
    tensors: dict[str, TensorInfo] = {}
    for name, dims, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise CorruptFileError(f"{path}: tensor {name} has unknown type id {ttype}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            raise CorruptFileError(
                f"{path}: truncated GGUF file (tensor {name} ends at byte {start + nbytes}, "
                f"file has {size})",
                hint="re-download or re-export the file",
            )
        shape = tuple(int(d) for d in reversed(dims))
        tensors[name] = TensorInfo(name, shape, qtype.name, nbytes, path, start)
    return meta, tensors


def dequantize_rows(data: np.ndarray, qtype: str, n: int, name: str) -> np.ndarray:
    """GGUF block bytes (rows, row_bytes) -> float32 (rows, n), through qtool's codecs."""
    from qtool.kernels import CodecInputError, dequantize

    try:
        return dequantize(data, qtype, n, name=name)
    except CodecInputError as e:
        raise CorruptFileError(f"cannot decode GGUF tensor {name}: {e}") from e


def read_gguf_tensor(ckpt: Any, gguf_tensor: str) -> np.ndarray:
    """One GGUF tensor as float32 in PyTorch order, decoded from its block bytes."""
    info = ckpt.tensors[gguf_tensor]
    n = info.shape[-1]
    rows = info.numel // n
    if info.nbytes % rows:
        raise CorruptFileError(
            f"{info.file}: tensor {gguf_tensor} has {info.nbytes} bytes, not a whole number of "
            f"its {rows} rows",
            hint="re-download or re-export the file",
        )
    raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    data = np.asarray(raw).reshape(rows, info.nbytes // rows)
    return dequantize_rows(data, info.dtype, n, gguf_tensor).reshape(info.shape)
