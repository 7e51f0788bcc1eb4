"""``quantize`` / ``dequantize``: float rows to the exact GGUF bytes llama.cpp writes, and back.

``block_affine`` / ``block_codes`` / ``block_with_codes`` expose the integer grid under the bytes
(for GPTQ on GGUF grids: llama.cpp fits the scales, the solver picks the codes).
"""

from __future__ import annotations

import numpy as np

# Importing the family modules registers their codecs.
from qtool.kernels import floats, fp4, kquants, legacy, ternary  # noqa: F401
from qtool.kernels.codec import BACKENDS, CHUNK_VALUES, Codec, CodecInputError, default_threads
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


def _check_block_bytes(data: object, qt: QuantType, name: str) -> np.ndarray:
    """``data`` as uint8 ``(..., row_bytes)`` holding whole blocks of ``qt``, or a clear error."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise CodecInputError(f"{name}: expected uint8 block bytes, got {got}")
    if data.ndim == 0 or data.shape[-1] == 0 or data.shape[-1] % qt.type_size:
        raise CodecInputError(
            f"{name}: last dimension {data.shape[-1:]} is not a whole number of "
            f"{qt.type_size}-byte {qt.name} blocks"
        )
    return data


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
    data = _check_block_bytes(data, qt, name)
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


# --- the integer grid under the bytes ---------------------------------------------------------


def _grid_codec(qtype: str | QuantType, name: str) -> Codec:
    codec = codec_for(qtype, name)
    if codec.code_range is None:
        grids = ", ".join(k for k, c in Codec.registry.items() if c.code_range is not None)
        raise CodecInputError(
            f"{name}: {codec.qtype.name} has no affine grid of integer codes (a float type, or "
            f"a table of values per block such as MXFP4's); affine codes exist for {grids}"
        )
    return codec


def _blocks_by_chunk(codec: Codec, data: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """``(a, b, blocks)``: rows a..b of the flattened ``data`` as (n_blocks, type_size) blocks,
    in chunks of about ``CHUNK_VALUES`` weights so temporaries stay bounded."""
    qt = codec.qtype
    flat = np.ascontiguousarray(data).reshape(-1, data.shape[-1])
    r, n = flat.shape[0], data.shape[-1] // qt.type_size * qt.block_size
    step = max(1, CHUNK_VALUES // n)
    return [
        (a, min(r, a + step), flat[a : a + step].reshape(-1, qt.type_size))
        for a in range(0, r, step)
    ]


def block_affine(
    data: np.ndarray, qtype: str | QuantType, *, name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The grid of GGUF block bytes: ``(scale, offset, lo, hi)``.

    ``data``: uint8 ``(..., row_bytes)`` as :func:`dequantize` takes it. ``scale`` and
    ``offset`` are float32 ``(..., n)``: each weight decodes (llama.cpp's ``to_float``) to
    ``scale * code + offset`` with an integer code in ``[lo, hi]``. This is exact, as numbers,
    wherever the block's fp16 scale fields are finite; a block whose d (or dmin) overflowed to
    inf has non-finite scale/offset. Conventions per type: Q8_0 -128..127 (offset 0); Q4_0
    0..15 and Q5_0 0..31 (offset -8d / -16d); Q4_1 0..15 and Q5_1 0..31 (scale d, offset m);
    Q2_K 0..3, Q4_K 0..15, Q5_K 0..31 (scale d*sc_j, offset -dmin*m_j); Q3_K 0..7 (scale
    d*(sc_j - 32), offset -4*scale); Q6_K 0..63 (scale d*sc_j, offset -32*scale); TQ1_0 and
    TQ2_0 0..2 (scale d, offset -d). F32/F16/BF16 have no grid (CodecInputError).
    """
    codec = _grid_codec(qtype, name)
    qt = codec.qtype
    data = _check_block_bytes(data, qt, name)
    row_n = data.shape[-1] // qt.type_size * qt.block_size
    lead = data.shape[:-1]
    r = int(np.prod(lead, dtype=np.int64))
    scale = np.empty((r, row_n), np.float32)
    offset = np.empty((r, row_n), np.float32)
    assert codec.code_range is not None
    lo, hi = codec.code_range
    with np.errstate(all="ignore"):  # inf * 0 in a block with an overflowed scale
        for a, b, q in _blocks_by_chunk(codec, data):
            s, o, _, _ = codec.affine(q)
            scale[a:b] = s.reshape(b - a, row_n)
            offset[a:b] = o.reshape(b - a, row_n)
    return scale.reshape(*lead, row_n), offset.reshape(*lead, row_n), lo, hi


def block_codes(data: np.ndarray, qtype: str | QuantType, *, name: str = "tensor") -> np.ndarray:
    """The integer codes stored in GGUF block bytes, int32 ``(..., n)``, in the convention of
    :func:`block_affine`."""
    codec = _grid_codec(qtype, name)
    qt = codec.qtype
    data = _check_block_bytes(data, qt, name)
    row_n = data.shape[-1] // qt.type_size * qt.block_size
    lead = data.shape[:-1]
    out = np.empty((int(np.prod(lead, dtype=np.int64)), row_n), np.int32)
    for a, b, q in _blocks_by_chunk(codec, data):
        out[a:b] = codec.codes(q).reshape(b - a, row_n)
    return out.reshape(*lead, row_n)


def block_with_codes(
    data: np.ndarray, qtype: str | QuantType, codes: np.ndarray, *, name: str = "tensor"
) -> np.ndarray:
    """A copy of the block bytes ``data`` (uint8 ``(..., row_bytes)``) holding ``codes``.

    ``codes``: integers of shape ``(..., n)`` in the :func:`block_affine` convention and range;
    every scale, min and other header field of ``data`` is kept. Anything else (float codes,
    a wrong shape, a code out of range) is a CodecInputError naming the tensor and the place.
    """
    codec = _grid_codec(qtype, name)
    qt = codec.qtype
    data = _check_block_bytes(data, qt, name)
    row_n = data.shape[-1] // qt.type_size * qt.block_size
    if not isinstance(codes, np.ndarray):
        raise CodecInputError(f"{name}: codes must be a numpy array, got {type(codes).__name__}")
    want = (*data.shape[:-1], row_n)
    if codes.shape != want:
        raise CodecInputError(
            f"{name}: codes have shape {codes.shape}, expected {want} for "
            f"{qt.name} bytes of shape {data.shape}"
        )
    if codes.dtype.kind not in "iu":
        raise CodecInputError(
            f"{name}: codes must be integers, got dtype {codes.dtype} (round them first)"
        )
    assert codec.code_range is not None
    lo, hi = codec.code_range
    if codes.size:
        bad = (codes < lo) | (codes > hi)
        if bad.any():
            where = np.unravel_index(int(np.argmax(bad)), codes.shape)
            at = ", ".join(str(int(i)) for i in where)
            raise CodecInputError(
                f"{name}: code {int(codes[where])} at index ({at}) is outside {qt.name}'s "
                f"range [{lo}, {hi}]"
            )
    lead = data.shape[:-1]
    flat_codes = np.ascontiguousarray(codes).reshape(-1, row_n)
    out = np.empty((flat_codes.shape[0], data.shape[-1]), np.uint8)
    for a, b, q in _blocks_by_chunk(codec, data):
        c = flat_codes[a:b].reshape(-1, qt.block_size)
        out[a:b] = codec.with_codes(q, c).reshape(b - a, -1)
    return out.reshape(*lead, data.shape[-1])


def quantize_part(
    rows: np.ndarray,
    qtype: str | QuantType,
    imatrix: np.ndarray | None,
    row_sigma2: np.ndarray | None,
    *,
    name: str = "tensor",
) -> np.ndarray:
    """Encode blocks ``rows`` ``(r, n)`` cut from longer rows, exactly as :func:`quantize` would
    encode them inside those rows: ``row_sigma2`` ``(r,)`` is the whole rows' mean square
    (:func:`row_sigma2`), which llama.cpp's imatrix weights of Q4_0/Q4_1/Q5_0/Q5_1 use."""
    codec = codec_for(qtype, name)
    x = _as_float32(rows, name)
    if x.ndim != 2 or x.shape[1] % codec.qtype.block_size:
        raise CodecInputError(f"{name}: expected (rows, n) with n a multiple of the block size")
    _check_finite(x, name, "the input")
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw is not None and qw.shape != (x.shape[1],):
        raise CodecInputError(f"{name}: imatrix has shape {qw.shape}, expected ({x.shape[1]},)")
    s2 = None if row_sigma2 is None else np.ascontiguousarray(row_sigma2, dtype=np.float32)
    return codec.quantize_part(x, qw if codec.uses_imatrix else None, s2)


def row_sigma2(rows: np.ndarray) -> np.ndarray:
    """Each row's mean square, summed in llama.cpp's order (``sum_x2 / n`` in
    ``quantize_row_q4_0_impl`` and its siblings)."""
    from qtool.kernels._numeric import F32, seq_sum_sq

    x = np.ascontiguousarray(rows, dtype=np.float32)
    return (seq_sum_sq(x) / F32(x.shape[1])).astype(np.float32)
