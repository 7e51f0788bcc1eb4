"""llama.cpp's own codecs through ctypes: the reference the tests and the benchmark compare against.

Loads ``libggml-base`` from the installed llama-cpp-python (a dev dependency) without importing
``llama_cpp`` itself. ``ggml_quantize_chunk`` is exactly what ``llama-quantize`` calls per tensor
(with the importance matrix when one is given); ``ggml_get_type_traits(type)->to_float`` is the
decoder every backend falls back to. ctypes releases the GIL during the call, so Python threads
calling it on disjoint row ranges run in parallel, the way llama-quantize's worker threads do.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
from qtool.kernels.types import QuantType

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h (only the leading fields we read)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def library_path() -> Path:
    """Where llama-cpp-python put libggml-base; FileNotFoundError with the reason if nowhere."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"
        )
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            return libdir / name
    raise FileNotFoundError(f"no libggml-base shared library under {libdir}")


class Ggml:
    """The handful of libggml entry points qtool checks itself against."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or library_path()
        self.lib = ctypes.CDLL(str(self.path))
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib.ggml_quantize_init.restype = None
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)

    def traits(self, qt: QuantType) -> _TypeTraits:
        return self.lib.ggml_get_type_traits(qt.ggml_id).contents

    def quantize(
        self,
        qt: QuantType,
        rows: np.ndarray,
        imatrix: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """``ggml_quantize_chunk`` over a C-contiguous float32 ``(nrows, n)`` array."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        nrows, n = rows.shape
        if out is None:
            out = np.empty((nrows, qt.row_bytes(n)), np.uint8)
        qw = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            qw = imatrix.ctypes.data
        self.lib.ggml_quantize_init(qt.ggml_id)
        size = self.lib.ggml_quantize_chunk(
            qt.ggml_id, rows.ctypes.data, out.ctypes.data, 0, nrows, n, qw
        )
        assert size == out.nbytes, (size, out.nbytes)
        return out

    def dequantize(self, qt: QuantType, data: np.ndarray, n: int) -> np.ndarray:
        """``ggml_get_type_traits(type)->to_float`` over ``(nrows, row_bytes)`` uint8."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        out = np.empty((data.shape[0], n), np.float32)
        tr = self.traits(qt)
        if qt.name == "F32":
            out[...] = data.view(np.float32)
            return out
        fn = _TO_FLOAT(tr.to_float)
        fn(data.ctypes.data, out.ctypes.data, out.size)
        return out


@cache
def load() -> Ggml:
    """The process-wide handle (raises FileNotFoundError/OSError if the library is missing)."""
    return Ggml()
