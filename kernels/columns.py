"""Compiled inner loops of GPTQ's solve and of the exact Hessian sums (numba).

GPTQ's column loop (:func:`qtool.methods.gptq.gptq_quantize`) does, for every column of a lazy
batch, a handful of tiny tensor operations on one column and one rank-1 update of the rest of
the batch: at SmolLM2's widths that is some 25 dispatches of a few microseconds each per column,
most of a solve's time. The rows of that loop are independent (row ``r``'s codes depend only on
row ``r`` of the weight and on ``H^-1``), so :func:`gptq_rows` runs it row by row, each row's
columns in order, with the same float32 operations in the same order as the tensor version:

- an integer grid (``zero`` form): ``q = clamp(round(x / s) + z, lo, hi)``, ``x' = (q - z) s``;
- a GGUF block grid (``offset`` form): ``q = clamp(round((x - b) / s), lo, hi)`` (``0`` where
  ``s`` is 0), ``x' = s q + b``;
- ``e = (x - x') / d`` with ``d = [H^-1]_ii``, then ``w_j -= e [H^-1]_ij`` for ``j >= i``.

numba does not contract ``a*b + c`` into an FMA unless asked (no fastmath here), and every
operand is float32, so each value is rounded where the tensor code rounds it.

:func:`fold` is :func:`qtool.observers.stats.fold`'s TwoSum, entry by entry in one pass (the
tensor version makes six passes and three temporaries of the matrix).

``AVAILABLE`` is False without numba; callers then use their tensor code.
"""

from __future__ import annotations

import numpy as np

# the GGUF codecs' numba switch and decorator: one place decides how qtool compiles
from qtool.kernels._fast import _F0, AVAILABLE, _jit

__all__ = ["AVAILABLE", "fold", "gptq_rows"]


@_jit()
def gptq_rows(  # type: ignore[no-untyped-def]
    wt, hinv1, errt, codes_t, scale_t, base_t, sel, lo, hi, offset_form, a, b, col0, e
):
    """Columns ``a..b-1`` of a lazy batch, on transposed arrays (a column is
    a contiguous row, so the rank-1 updates run across rows in vector registers).

    ``wt`` ``[n, rows]``: the batch's columns (float32, updated in place: every later column of
    the batch gets each column's error); ``hinv1`` ``[n, n]``: the batch's block of the upper
    Cholesky factor of ``H^-1``; ``errt`` ``[n, rows]`` gets ``e``; ``codes_t`` int32
    ``[cols, rows]``: position ``col0 + i`` gets batch column ``i``'s codes; ``scale_t`` /
    ``base_t`` ``[m, rows]`` float32 and ``sel`` ``[cols]``: position ``col0 + i`` uses
    parameter row ``sel[col0 + i]`` (``base``: the zero point as float32, or the offset);
    ``lo``/``hi``: float32 code range; ``e``: float32 scratch ``[rows]``."""
    n, rows = wt.shape
    for i in range(a, b):
        col = col0 + i
        k = sel[col]
        d = hinv1[i, i]
        for r in range(rows):  # from 0: numba then knows r >= 0 and vectorises
            s = scale_t[k, r]
            z = base_t[k, r]
            x = wt[i, r]
            if offset_form:
                ratio = (x - z) / s if s != _F0 else _F0
                q = min(max(np.rint(ratio), lo), hi)
                xq = s * q + z
            else:
                q = min(max(np.rint(x / s) + z, lo), hi)
                xq = (q - z) * s
            codes_t[col, r] = np.int32(q)
            e[r] = (x - xq) / d
            errt[i, r] = e[r]
        for j in range(i, n):
            h = hinv1[i, j]
            for r in range(rows):  # from 0: numba then knows r >= 0 and vectorises
                wt[j, r] = wt[j, r] - e[r] * h


@_jit()
def fold(hi, lo, p):  # type: ignore[no-untyped-def]
    """``hi + lo += p`` exactly (float64 ``hi``, ``lo`` ``[m, n]``; ``p`` float32 or float64):
    Knuth's TwoSum per entry, as the tensor version computes it."""
    m, n = hi.shape
    for r in range(m):
        for c in range(n):
            v = np.float64(p[r, c])
            h = hi[r, c]
            s = h + v
            b = s - h
            lo[r, c] = lo[r, c] + ((h - (s - b)) + (v - b))
            hi[r, c] = s
