"""Ternary types for BitNet b1.58 / TriLM weights: TQ1_0 and TQ2_0 (values -1, 0, +1 times d).

Both take d = max|x| and q = lroundf(x / d) + 1 in {0, 1, 2}; they differ in packing. llama.cpp
ignores the importance matrix for both (``quantize_tq1_0`` / ``quantize_tq2_0``), and so do we.

Codes (``affine`` / ``codes`` / ``with_codes``): the stored trit q in 0..2, scale d, offset -d.
"""

from __future__ import annotations

import numpy as np
from qtool.kernels._numeric import F32, fp16_bits
from qtool.kernels.codec import Codec
from qtool.kernels.kquants import _pack_2bit, _unpack_2bit
from qtool.kernels.types import QK_K


def _trits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d, q) with q = lroundf(x * (1/d)) + 1 (round half away from zero), as int32."""
    d = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        idv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    v = x * idv[:, None]
    q = np.copysign(np.floor(np.abs(v).astype(np.float64) + 0.5), v).astype(np.int32) + 1
    return d, q


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return fp16_bits(v).astype("<u2").view(np.uint8).reshape(-1, 2)


def _f16_at(q: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(q[:, at : at + 2]).view("<f2").astype(F32)


def _base3_bytes(digits: np.ndarray, extra_shift: bool = False) -> np.ndarray:
    """Digits (..., k) most significant first -> bytes holding ceil(value * 256 / 243).

    Storing the number as a fixed-point fraction of 3**5 lets the decoder pull out each trit
    with a multiply and a shift instead of a division.
    """
    q = np.zeros(digits.shape[:-1], np.int32)
    for i in range(digits.shape[-1]):
        q = (q * 3 + digits[..., i]) & 0xFF  # uint8 arithmetic, as in C
    if extra_shift:
        q = (q * 3) & 0xFF
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _unbase3(b: np.ndarray, n: int) -> np.ndarray:
    """Bytes (...) -> trits (..., n): ``((uint8)(b * 3**i) * 3) >> 8``, minus nothing yet."""
    out = []
    for i in range(n):
        q = (b.astype(np.int32) * (3**i)) & 0xFF
        out.append((q * 3) >> 8)
    return np.stack(out, axis=-1)


# TQ1_0, 54 bytes per 256 weights:
#   | qs[48]: bytes 0-31: byte m packs q[m + 32n] for n = 0..4 (base 3, first most significant);
#   |         bytes 32-47: byte 32+m packs q[160 + m + 16n] for n = 0..4
#   | qh[4]: byte j packs q[240 + j + 4n] for n = 0..3, then times 3 | d: fp16 |
#   each packed byte is ceil(v * 256 / 243);  x = d * (q - 1)
# Matches quantize_row_tq1_0_ref / dequantize_row_tq1_0.
class TQ1_0(Codec, type_name="TQ1_0"):
    """1.6875 bits per weight ternary."""

    code_range = (0, 2)

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        d, q = _trits(x)
        return np.concatenate([_pack_tq1(q), _f16_bytes(d)], axis=1)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d, offset -d, codes 0..2. ggml computes ``(q - 1) * d``: the same value for a
        finite d (its middle code gives d's signed zero where ``d - d`` gives +0)."""
        d = np.repeat(_f16_at(q, 52), QK_K, axis=1)
        return d, -d, 0, 2

    def codes(self, q: np.ndarray) -> np.ndarray:
        nb = q.shape[0]
        a = _unbase3(q[:, :32], 5).transpose(0, 2, 1).reshape(nb, 160)
        b = _unbase3(q[:, 32:48], 5).transpose(0, 2, 1).reshape(nb, 80)
        c = _unbase3(q[:, 48:52], 4).transpose(0, 2, 1).reshape(nb, 16)
        return np.concatenate([a, b, c], axis=1).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, :52] = _pack_tq1(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        return (self.codes(q) - 1).astype(F32) * _f16_at(q, 52)


def _pack_tq1(q: np.ndarray) -> np.ndarray:
    """(nb, 256) trits 0..2 -> the 52 packed bytes of TQ1_0 (qs, then qh)."""
    nb = q.shape[0]
    a = q[:, :160].reshape(nb, 5, 32).transpose(0, 2, 1)  # (nb, m, n)
    b = q[:, 160:240].reshape(nb, 5, 16).transpose(0, 2, 1)
    c = q[:, 240:256].reshape(nb, 4, 4).transpose(0, 2, 1)
    return np.concatenate([_base3_bytes(a), _base3_bytes(b), _base3_bytes(c, True)], axis=1)


# TQ2_0, 66 bytes per 256 weights:
#   | qs[64]: byte 32h + m holds q[128h + m + 32n] at bits 2n..2n+1, n = 0..3 | d: fp16 |
#   x = d * (q - 1)
# Matches quantize_row_tq2_0_ref / dequantize_row_tq2_0.
class TQ2_0(Codec, type_name="TQ2_0"):
    """2.0625 bits per weight ternary."""

    code_range = (0, 2)

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        d, q = _trits(x)
        return np.concatenate([_pack_2bit(q), _f16_bytes(d)], axis=1)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d, offset -d, codes 0..2. ggml computes ``(q - 1) * d``: the same value for a
        finite d (its middle code gives d's signed zero where ``d - d`` gives +0). The 2-bit
        field could hold 3 (decoding to 2d); llama.cpp never writes it and ``with_codes``
        refuses it."""
        d = np.repeat(_f16_at(q, 64), QK_K, axis=1)
        return d, -d, 0, 2

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack_2bit(q[:, :64]).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, :64] = _pack_2bit(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        return (self.codes(q) - 1).astype(F32) * _f16_at(q, 64)
