"""The legacy 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Without an importance matrix each matches ``quantize_row_<type>_ref`` (one scale from the block's
extreme values). With one, Q4_0/Q4_1/Q5_0/Q5_1 match ``quantize_row_<type>_impl``: weights
``qw[j] * sqrt(sigma2 + x[j]^2)`` with ``sigma2`` the mean square of the whole row, then the
``make_qx_quants`` / ``make_qkx3_quants`` search. Q8_0 ignores the importance matrix, as
``quantize_q8_0`` does.

Codes (``affine`` / ``codes`` / ``with_codes``): Q8_0 the stored int8, -128..127, offset 0;
Q4_0/Q5_0 the stored unsigned nibble/5-bit value, 0..15/0..31, offset -8d/-16d; Q4_1/Q5_1 the
stored 0..15/0..31, scale d, offset m.
"""

from __future__ import annotations

import numpy as np
from qtool.kernels import _search
from qtool.kernels._numeric import F32, first_max, first_max_abs, first_min, fp16_bits, seq_sum_sq
from qtool.kernels.codec import Codec
from qtool.kernels.types import QK


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(nb,) float32 -> (nb, 2) uint8, the little-endian ggml_half."""
    return fp16_bits(v).astype("<u2").view(np.uint8).reshape(-1, 2)


def _f16_values(q: np.ndarray, at: int) -> np.ndarray:
    """The ggml_half at byte offset ``at`` of each block, as float32 (nb, 1)."""
    return np.ascontiguousarray(q[:, at : at + 2]).view("<f2").astype(F32)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0x0F) | ((hi.astype(np.uint8) & 0x0F) << 4)


def _pack4(L: np.ndarray) -> np.ndarray:
    """(nb, 32) values 0..15 -> (nb, 16): byte j = L[j] | L[j + 16] << 4."""
    return _nibbles(L[:, :16], L[:, 16:])


def _unpack4(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack4`: (nb, 16) bytes -> (nb, 32) int32."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)


def _pack5(L: np.ndarray) -> np.ndarray:
    """(nb, 32) values 0..31 -> (nb, 20): the u32 of high bits, then the nibbles as Q4_0."""
    return np.concatenate([_high_bits(L), _pack4(L)], axis=1)


def _trunc_u8(v: np.ndarray) -> np.ndarray:
    """C's float -> int8/uint8 cast (truncate toward zero; values here are within range)."""
    return np.trunc(v).astype(np.int32)


def _high_bits(L: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 quants, packed little-endian into a uint32 -> (nb, 4) bytes."""
    bits = ((L.astype(np.uint32) >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])``, sigma2 broadcast per block."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


class _Legacy(Codec):
    """Shared imatrix plumbing: the weights need the mean square of the whole row."""

    uses_imatrix = True

    def quantize_rows(self, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        if imatrix is None:
            return super().quantize_rows(rows, None)
        r, n = rows.shape
        nb = n // QK
        sigma2 = np.repeat(seq_sum_sq(rows) / F32(n), nb)
        x = rows.reshape(-1, QK)
        qw = np.broadcast_to(imatrix.reshape(1, nb, QK), (r, nb, QK)).reshape(-1, QK)
        return self.quantize_weighted(x, _weights(x, qw, sigma2)).reshape(r, -1)

    def quantize_weighted(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The imatrix variant, given the final per-element weights (row statistics folded in)."""
        raise NotImplementedError

    def quantize_part(
        self, rows: np.ndarray, imatrix: np.ndarray | None, sigma2: np.ndarray | None
    ) -> np.ndarray:
        """Blocks that are part of longer rows whose mean square (``sigma2``, one per row) the
        imatrix weights use, as :meth:`quantize_rows` computes it over the whole row."""
        if imatrix is None or sigma2 is None:
            return super().quantize_part(rows, imatrix, sigma2)
        r, n = rows.shape
        nb = n // QK
        s2 = np.repeat(np.asarray(sigma2, dtype=F32), nb)
        x = rows.reshape(-1, QK)
        qw = np.broadcast_to(imatrix.reshape(1, nb, QK), (r, nb, QK)).reshape(-1, QK)
        return self.quantize_weighted(x, _weights(x, qw, s2)).reshape(r, -1)


# Q8_0, 34 bytes: | d: fp16 | qs[32]: int8 |          x = d * q
# Matches quantize_row_q8_0_ref / dequantize_row_q8_0.
class Q8_0(Codec, type_name="Q8_0"):
    """8-bit symmetric: d = max|x| / 127, q = roundf(x / d) (half away from zero)."""

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        amax = np.abs(x).max(axis=1)
        d = amax / F32(127)
        with np.errstate(divide="ignore"):
            idv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        v = x * idv[:, None]
        # roundf: half away from zero; |v| + 0.5 is exact in float64
        q = np.copysign(np.floor(np.abs(v).astype(np.float64) + 0.5), v).astype(np.int8)
        return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)

    code_range = (-128, 127)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d, offset 0, codes -128..127 (ggml: ``q * d``, the same float)."""
        d = _f16_values(q, 0)
        scale = np.repeat(d, QK, axis=1)
        return scale, np.zeros_like(scale), -128, 127

    def codes(self, q: np.ndarray) -> np.ndarray:
        return q[:, 2:].view(np.int8).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, 2:] = c.astype(np.int8).view(np.uint8)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        d = _f16_values(q, 0)
        return self.codes(q).astype(F32) * d


# Q4_0, 18 bytes: | d: fp16 | qs[16]: byte j = q[j] (low nibble) | q[j+16] << 4 |
#                  x = d * (q - 8)
# Matches quantize_row_q4_0_ref, quantize_row_q4_0_impl (imatrix), dequantize_row_q4_0.
class Q4_0(_Legacy, type_name="Q4_0"):
    """4-bit symmetric: d = (signed max-magnitude value) / -8."""

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        _, vmax = first_max_abs(x)
        d = vmax / F32(-8)
        with np.errstate(divide="ignore"):
            idv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        L = np.minimum(15, _trunc_u8(x * idv[:, None] + F32(8.5)))
        return np.concatenate([_f16_bytes(d), _pack4(L)], axis=1)

    def quantize_weighted(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        d, L = _search.make_qx_quants(x, 8, w)
        return np.concatenate([_f16_bytes(d), _pack4(L)], axis=1)

    code_range = (0, 15)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d, offset -8d, codes 0..15. ggml computes ``(q - 8) * d``: the same float for a
        finite d (every product here is exact in float32)."""
        d = np.repeat(_f16_values(q, 0), QK, axis=1)
        return d, F32(-8) * d, 0, 15

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack4(q[:, 2:18])

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, 2:18] = _pack4(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        d = _f16_values(q, 0)
        return (self.codes(q) - 8).astype(F32) * d


# Q4_1, 20 bytes: | d: fp16 | m: fp16 | qs[16]: q[j] | q[j+16] << 4 |     x = d * q + m
# Matches quantize_row_q4_1_ref, quantize_row_q4_1_impl (imatrix), dequantize_row_q4_1.
class Q4_1(_Legacy, type_name="Q4_1"):
    """4-bit affine: d = (max - min) / 15, m = min."""

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        mn = first_min(x)
        mx = first_max(x)
        d = (mx - mn) / F32(15)
        with np.errstate(divide="ignore"):
            idv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        L = np.minimum(15, _trunc_u8((x - mn[:, None]) * idv[:, None] + F32(0.5)))
        return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _pack4(L)], axis=1)

    def quantize_weighted(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        d, the_min, L = _search.make_qkx_quants(x, w, 15, -0.9, 0.05, 36, False, False)
        return np.concatenate([_f16_bytes(d), _f16_bytes(-the_min), _pack4(L)], axis=1)

    code_range = (0, 15)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d, offset m, codes 0..15 (ggml: ``q * d + m``, the same float)."""
        d = np.repeat(_f16_values(q, 0), QK, axis=1)
        return d, np.repeat(_f16_values(q, 2), QK, axis=1), 0, 15

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack4(q[:, 4:20])

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, 4:20] = _pack4(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        d = _f16_values(q, 0)
        m = _f16_values(q, 2)
        return self.codes(q).astype(F32) * d + m


# Q5_0, 22 bytes: | d: fp16 | qh: u32, bit j = bit 4 of q[j] | qs[16]: low nibbles as Q4_0 |
#                  x = d * (q - 16)
# Matches quantize_row_q5_0_ref, quantize_row_q5_0_impl (imatrix), dequantize_row_q5_0.
class Q5_0(_Legacy, type_name="Q5_0"):
    """5-bit symmetric: d = (signed max-magnitude value) / -16."""

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        _, vmax = first_max_abs(x)
        d = vmax / F32(-16)
        with np.errstate(divide="ignore"):
            idv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        L = np.minimum(31, _trunc_u8(x * idv[:, None] + F32(16.5)))
        return self._pack(d, L)

    def quantize_weighted(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        d, L = _search.make_qx_quants(x, 16, w)
        return self._pack(d, L)

    @staticmethod
    def _pack(d: np.ndarray, L: np.ndarray) -> np.ndarray:
        return np.concatenate([_f16_bytes(d), _pack5(L)], axis=1)

    code_range = (0, 31)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d, offset -16d, codes 0..31. ggml computes ``(q - 16) * d``: the same float for
        a finite d (every product here is exact in float32)."""
        d = np.repeat(_f16_values(q, 0), QK, axis=1)
        return d, F32(-16) * d, 0, 31

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack5(q, 2).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, 2:22] = _pack5(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        d = _f16_values(q, 0)
        return (self.codes(q) - 16).astype(F32) * d


# Q5_1, 24 bytes: | d: fp16 | m: fp16 | qh: u32 high bits | qs[16]: low nibbles |
#                  x = d * q + m
# Matches quantize_row_q5_1_ref, quantize_row_q5_1_impl (imatrix), dequantize_row_q5_1.
class Q5_1(_Legacy, type_name="Q5_1"):
    """5-bit affine: d = (max - min) / 31, m = min."""

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        mn = first_min(x)
        mx = first_max(x)
        d = (mx - mn) / F32(31)
        with np.errstate(divide="ignore"):
            idv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        L = _trunc_u8((x - mn[:, None]) * idv[:, None] + F32(0.5)) & 0xFF
        return self._pack(d, mn, L)

    def quantize_weighted(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        d, the_min, L = _search.make_qkx_quants(x, w, 31, -0.9, 0.05, 36, False, False)
        return self._pack(d, -the_min, L)

    @staticmethod
    def _pack(d: np.ndarray, m: np.ndarray, L: np.ndarray) -> np.ndarray:
        return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack5(L)], axis=1)

    code_range = (0, 31)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d, offset m, codes 0..31 (ggml: ``q * d + m``, the same float)."""
        d = np.repeat(_f16_values(q, 0), QK, axis=1)
        return d, np.repeat(_f16_values(q, 2), QK, axis=1), 0, 31

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack5(q, 4).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, 4:24] = _pack5(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        d = _f16_values(q, 0)
        m = _f16_values(q, 2)
        return self.codes(q).astype(F32) * d + m


def _unpack5(q: np.ndarray, at: int) -> np.ndarray:
    """32 five-bit quants from a u32 of high bits at ``at`` and 16 nibble bytes after it."""
    qh = np.ascontiguousarray(q[:, at : at + 4]).view("<u4").astype(np.uint32)
    hi = ((qh >> np.arange(QK, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    qs = q[:, at + 4 : at + 20]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1) | hi
