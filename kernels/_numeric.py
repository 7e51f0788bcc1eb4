"""Bit-exact float32 building blocks that llama.cpp's C code relies on, vectorised with numpy.

Everything here works on whole arrays of "lanes" (one lane per block or sub-block) so the codecs
can run llama.cpp's scalar per-block algorithms for thousands of blocks at once. Two C details
matter for identical bytes:

* ``nearest_int`` rounds by adding 1.5 * 2**23 and reading the mantissa bits; we do the same bit
  trick, so even out-of-range inputs give what C gives.
* The build llama-cpp-python makes compiles ggml-base (where the quantizers live) with ``-O3``
  and no ``-march``, i.e. plain SSE2: ``objdump -d libggml-base.so`` shows no ``vfmadd``, so
  ``a*b + c`` is two float32 roundings there and here. Sums run in C's order, never pairwise.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32

_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round(x) in the low mantissa bits


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: round half to even via the 1.5*2**23 trick, as int32."""
    t = (np.asarray(v, F32) + _MAGIC).astype(F32, copy=False)
    return (t.view(np.int32) & 0x007FFFFF) - 0x00400000


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bits, round to nearest even (GGML_FP32_TO_FP16 on finite input)."""
    return np.asarray(v, F32).astype(np.float16).view(np.uint16)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """The float32 value a float32 takes after a trip through fp16 (store, then reload)."""
    return np.asarray(v, F32).astype(np.float16).astype(F32)


def first_max_abs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per lane: the largest |x| and the signed value that reached it first.

    Mirrors ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` starting from 0: ties keep the
    earliest element, NaNs are skipped, and a lane of zeros (or NaNs) gives ``max == +0.0`` (the
    initial value), not ``-0.0``.
    """
    ax = np.abs(x)
    ax = np.where(np.isnan(ax), F32(-1), ax)  # C's `amax < |v|` never picks a NaN
    idx = np.argmax(ax, axis=-1)
    amax = np.take_along_axis(ax, idx[..., None], axis=-1)[..., 0]
    vmax = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    vmax = np.where(amax > 0, vmax, F32(0.0)).astype(F32)
    return amax, vmax


def first_min(x: np.ndarray) -> np.ndarray:
    """Per lane: the minimum as a strict ``v < min`` scan finds it (sign of a zero included)."""
    idx = np.argmin(x, axis=-1)
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def first_max(x: np.ndarray) -> np.ndarray:
    """Per lane: the maximum as a strict ``v > max`` scan finds it (sign of a zero included)."""
    idx = np.argmax(x, axis=-1)
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def seq_sum_sq(x: np.ndarray) -> np.ndarray:
    """``s = 0; for v in lane: s += v*v`` in C's order (numpy's sum is pairwise, so not that)."""
    s = np.zeros(x.shape[:-1], F32)
    for i in range(x.shape[-1]):
        s += x[..., i] * x[..., i]
    return s


def seq_sum(x: np.ndarray) -> np.ndarray:
    """``s = 0; for v in lane: s += v`` in C's order."""
    s = np.zeros(x.shape[:-1], F32)
    for i in range(x.shape[-1]):
        s += x[..., i]
    return s
