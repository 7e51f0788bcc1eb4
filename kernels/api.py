"""``quantize`` / ``dequantize``: float rows to the exact GGUF bytes llama.cpp writes, and back."""

from __future__ import annotations

import numpy as np

# Importing the family modules registers their codecs.
from qtool.kernels import floats, kquants, legacy, ternary  # noqa: F401
from qtool.kernels.codec import BACKENDS, Codec, CodecInputError, default_threads
from qtool.kernels.types import QuantType, get_type

_FLOAT_INPUTS = ("float32", "float16", "bfloat16")


def codec_for(qtype: str | QuantType, name: str = "tensor") -> Codec:
    """The registered codec of a type name or :class:`QuantType`."""
    key = qtype.name if isinstance(qtype, QuantType) else qtype
    try:
        return Codec.registry[get_type(str(key)).name]
    except KeyError:
        known = ", ".join(Codec.registry)
        raise CodecInputError(
            f"{name}: no codec for tensor type {key!r}; supported: {known}"
        ) from None


def _as_float32(rows: object, name: str) -> np.ndarray:
    """float32 view/copy of the input; float16 and bfloat16 widen exactly, anything else fails."""
    if type(rows).__module__.startswith("torch"):
        import torch

        t = rows  # type: ignore[assignment]
        if not isinstance(t, torch.Tensor):
            raise CodecInputError(f"{name}: expected an array, got {type(rows).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise CodecInputError(
                f"{name}: dtype {t.dtype} is not accepted; the codecs take float32, float16 or "
                "bfloat16 (convert explicitly if a lossy cast is intended)"
            )
        return t.detach().to("cpu", torch.float32).contiguous().numpy()
    if not isinstance(rows, np.ndarray):
        raise CodecInputError(
            f"{name}: expected a numpy array of float32 rows, got {type(rows).__name__}"
        )
    dt = rows.dtype
    if dt.name not in _FLOAT_INPUTS:
        raise CodecInputError(
            f"{name}: dtype {dt} is not accepted; the codecs take float32, float16 or bfloat16 "
            "(convert explicitly if a lossy cast is intended)"
        )
    return np.asarray(rows, dtype=np.float32, order="C")  # keeps 0-d arrays 0-d


def _check_finite(x: np.ndarray, name: str, what: str) -> None:
    flat = x.reshape(-1)
    step = 1 << 22  # in slices, so a huge tensor needs no tensor-sized mask
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        if np.isfinite(part).all():
            continue
        bad = np.unravel_index(start + int(np.argmin(np.isfinite(part))), x.shape)
        val = x[bad]
        where = ", ".join(str(int(i)) for i in bad)
        raise CodecInputError(
            f"{name}: {what} contains {val} at index ({where}); GGUF codecs need finite values"
        )


def quantize(
    rows: np.ndarray,
    qtype: str | QuantType,
    imatrix: np.ndarray | None = None,
    *,
    name: str = "tensor",
    threads: int | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Encode float rows to the exact GGUF block bytes of ``qtype``.

    ``rows``: float32 (float16/bfloat16 are widened exactly) of shape ``(..., n)`` with ``n`` a
    multiple of the type's block size; finite values only. ``imatrix``: per-column importance,
    shape ``(n,)``, as ``llama-quantize --imatrix`` passes it to ``ggml_quantize_chunk``. F32,
    F16, BF16, Q8_0, TQ1_0 and TQ2_0 ignore it, as llama.cpp does (its length is still checked);
    the other types switch to llama.cpp's importance-weighted search. Returns uint8 of shape
    ``(..., n // block_size * type_size)``. ``threads``: worker threads (default: all cores).
    ``backend``: "auto" (the compiled fast path where there is one), "reference" (numpy) or
    "fast"; all give identical bytes.
    """
    codec = codec_for(qtype, name)
    qt = codec.qtype
    if backend not in BACKENDS:
        raise CodecInputError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    x = _as_float32(rows, name)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise CodecInputError(f"{name}: expected rows of shape (..., n) with n > 0, got {x.shape}")
    n = x.shape[-1]
    if n % qt.block_size:
        raise CodecInputError(
            f"{name}: row length {n} is not a multiple of {qt.name}'s block size "
            f"{qt.block_size}; the codec does not pad"
        )
    _check_finite(x, name, "the input")
    qw = None
    if imatrix is not None:
        im = np.asarray(imatrix)
        if im.dtype.kind != "f":
            raise CodecInputError(f"{name}: imatrix must be floating point, got dtype {im.dtype}")
        if im.shape != (n,):
            raise CodecInputError(
                f"{name}: imatrix has shape {im.shape}, expected ({n},): one weight per column"
            )
        qw = np.ascontiguousarray(im, dtype=np.float32)
        _check_finite(qw, name, "the imatrix")
    if backend == "fast" and codec.fast_kernel(qw is not None and codec.uses_imatrix) is None:
        raise CodecInputError(
            f"{name}: {qt.name} has no compiled fast path here (is numba installed?); "
            "use backend='auto' or 'reference'"
        )
    lead = x.shape[:-1]
    flat = x.reshape(-1, n)
    nthreads = default_threads() if threads is None else max(1, int(threads))
    out = codec.quantize(flat, qw, threads=nthreads, backend=backend)
    return out.reshape(*lead, out.shape[-1])


def dequantize(
    data: np.ndarray,
    qtype: str | QuantType,
    n: int | None = None,
    *,
    name: str = "tensor",
    threads: int | None = None,
) -> np.ndarray:
    """Decode GGUF block bytes, uint8 ``(..., row_bytes)``, to float32 ``(..., n)``.

    Matches llama.cpp's ``to_float`` for the type bit for bit. ``n`` (optional) is checked
    against the row length the bytes imply.
    """
    codec = codec_for(qtype, name)
    qt = codec.qtype
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise CodecInputError(f"{name}: expected uint8 block bytes, got {got}")
    if data.ndim == 0 or data.shape[-1] == 0 or data.shape[-1] % qt.type_size:
        raise CodecInputError(
            f"{name}: last dimension {data.shape[-1:]} is not a whole number of "
            f"{qt.type_size}-byte {qt.name} blocks"
        )
    row_n = data.shape[-1] // qt.type_size * qt.block_size
    if n is not None and n != row_n:
        raise CodecInputError(
            f"{name}: {data.shape[-1]} bytes per row of {qt.name} hold {row_n} values, not {n}"
        )
    lead = data.shape[:-1]
    flat = np.ascontiguousarray(data).reshape(-1, data.shape[-1])
    nthreads = default_threads() if threads is None else max(1, int(threads))
    out = codec.dequantize(flat, threads=nthreads)
    return out.reshape(*lead, row_n)
