"""A safetensors file written one tensor at a time, byte for byte what ``save_file`` writes.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; for the 2 GB
shards of :mod:`.folder` that was up to 2 GB of a process's peak, growing with the model's
depth. :class:`SafetensorsFile` instead appends each tensor's bytes to a spool file beside the
output as it arrives (holding the tensor only while it is written), and at :meth:`close`
writes the header and copies the spooled data after it in safetensors' order, in the kernel
where it can (``copy_file_range``), else in ``_CHUNK`` pieces. Memory stays at one tensor (and
a chunk); the disk holds one file's data twice until the spool is removed.

The bytes follow safetensors' serializer (``prepare`` in ``safetensors/src/tensor.rs``):

- the tensors are ordered by dtype, descending in the order of its ``Dtype`` enum (its
  alignment order, ``_DTYPES`` below), then by name; the data follows in that order with no
  gaps, and each tensor's ``data_offsets`` are relative to the start of the data;
- the header is compact JSON (serde_json: no spaces, non-ASCII text as UTF-8):
  ``__metadata__`` first when given, then ``{"dtype", "shape", "data_offsets"}`` for each
  tensor in that order, padded with spaces to a multiple of 8 bytes;
- the file starts with the padded header's length as a little-endian u64.

``tests/quantize/test_streamed.py`` checks the bytes against the installed ``save_file``.
One difference is left: safetensors keeps ``__metadata__`` in a hash map, so with several keys
its order varies from run to run; here the keys keep the order given (one key, as qtool
writes, is the same either way).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

import torch

# safetensors' Dtype enum in declaration order (increasing alignment) with the torch dtype
# name of each; the ones torch lacks (or names differently in this version) are skipped.
# F4 is left out: safetensors doubles the last dimension of a packed float4 tensor's shape.
_ENUM = (
    ("BOOL", "bool"),
    ("F4", ""),
    ("F6_E2M3", ""),
    ("F6_E3M2", ""),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
)
# torch dtype -> (header code, rank in the enum)
_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    getattr(torch, name): (code, rank)
    for rank, (code, name) in enumerate(_ENUM)
    if name and isinstance(getattr(torch, name, None), torch.dtype)
}
# the integer views that swap a dtype's bytes on a big-endian host (complex64: each float32)
_SWAP = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 8 << 20  # the copy's buffer where the kernel cannot copy between the files
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


class SafetensorsFile:
    """A safetensors file at ``path`` taking tensors one at a time (:meth:`add`), finished by
    :meth:`close`. Until then only the spool ``.<name>.data`` beside ``path`` exists;
    :meth:`discard` (after a failure) closes and removes it. Callers that need the output
    atomic create it inside a temporary folder (:func:`qtool.io.atomic_dir`)."""

    def __init__(self, path: Path | str, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self.spool_path = self.path.with_name(f".{self.path.name}.data")
        self._spool: BinaryIO | None = open(self.spool_path, "w+b")  # noqa: SIM115 - spans calls
        # name -> (dtype code, enum rank, shape, offset in the spool, bytes), in arrival order
        self.entries: dict[str, tuple[str, int, list[int], int, int]] = {}
        self.bytes = 0

    @property
    def names(self) -> list[str]:
        """The tensors added so far, in the order they came."""
        return list(self.entries)

    def add(self, name: str, t: torch.Tensor) -> None:
        """Append ``t``'s bytes to the spool; ``t`` is not kept."""
        if self._spool is None:
            raise ValueError(f"{self.path}: already closed")
        if name in self.entries:
            raise ValueError(f"{name}: added twice to {self.path.name}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: safetensors cannot store {t.dtype} here")
        if t.layout != torch.strided:
            raise ValueError(f"{name}: a sparse tensor; store it dense")
        code, rank = _DTYPES[t.dtype]
        data = _raw_bytes(t)
        self._spool.write(data)
        self.entries[name] = (code, rank, list(t.shape), self.bytes, len(data))
        self.bytes += len(data)

    def header(self) -> bytes:
        """The length prefix and the padded JSON header, as ``save_file`` makes them."""
        head: dict[str, Any] = {}
        if self.metadata is not None:
            head["__metadata__"] = self.metadata
        offset = 0
        for name, (code, _, shape, _, n) in self._ordered():
            head[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    def close(self) -> None:
        """Write the file: the header, then the spooled data in safetensors' order."""
        spool = self._spool
        if spool is None:
            raise ValueError(f"{self.path}: already closed")
        try:
            spool.flush()
            with open(self.path, "wb") as out:
                out.write(self.header())
                out.flush()
                for _, (_, _, _, start, n) in self._ordered():
                    _copy_range(spool.fileno(), out.fileno(), start, n)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close and remove the spool (the finished file, if any, stays)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.spool_path.unlink(missing_ok=True)

    def _ordered(self) -> list[tuple[str, tuple[str, int, list[int], int, int]]]:
        # save_file's order: dtype rank descending, then name (Rust compares UTF-8 bytes,
        # which orders like Python's code points)
        return sorted(self.entries.items(), key=lambda kv: (-kv[1][1], kv[0]))


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """``t``'s elements as little-endian bytes in C order (a copy only where ``t`` is not a
    contiguous CPU tensor, or on a big-endian host)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    size = 4 if flat.dtype == torch.complex64 else flat.element_size()
    if sys.byteorder == "big" and size > 1:
        swapped = flat.view(torch.uint8).view(_SWAP[size]).numpy().byteswap()
        return swapped.data.cast("B")
    return flat.view(torch.uint8).numpy().data


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to ``dst``'s current position: in the
    kernel (``copy_file_range``; a reflink on filesystems that share extents), else through a
    buffer of at most ``_CHUNK`` bytes."""
    kernel = hasattr(os, "copy_file_range")
    while count > 0:
        if kernel:
            try:
                n = os.copy_file_range(src, dst, count, offset)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
                continue
        else:
            buf = memoryview(os.pread(src, min(count, _CHUNK), offset))
            n = len(buf)
            while buf:
                buf = buf[os.write(dst, buf) :]
        if n == 0:
            raise OSError(errno.EIO, "the spooled tensor data ended early")
        offset += n
        count -= n
