"""The k-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-weight super-blocks of 16 or 32-weight blocks).

Each super-block stores quantized per-block scales (and mins) plus one or two fp16 super-scales.
Without an importance matrix each type matches ``quantize_row_<type>_ref``; with one it matches
``quantize_row_<type>_impl`` (what ``quantize_<type>`` calls when ``quant_weights`` is set).
The searches themselves live in ``_search.py``; this file is layouts, scales and packing.

Codes (``affine`` / ``codes`` / ``with_codes``), per weight of sub-block j: Q2_K 0..3, scale
d * sc_j, offset -dmin * m_j; Q3_K 0..7 (the 2 low bits plus 4 * the hmask bit), scale
d * (sc_j - 32), offset -4 * scale; Q4_K/Q5_K 0..15/0..31, scale d * s_j, offset -dmin * m_j;
Q6_K 0..63, scale d * sc_j, offset -32 * scale.
"""

from __future__ import annotations

import numpy as np
from qtool.kernels import _search
from qtool.kernels._numeric import (
    F32,
    first_max_abs,
    fp16_bits,
    fp16_round,
    nearest_int,
    seq_sum,
    seq_sum_sq,
)
from qtool.kernels.codec import Codec
from qtool.kernels.types import QK_K

GROUP_MAX_EPS = _search.GROUP_MAX_EPS


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return fp16_bits(v).astype("<u2").view(np.uint8).reshape(-1, 2)


def _f16_at(q: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(q[:, at : at + 2]).view("<f2").astype(F32)[:, 0]


def _pos_max(v: np.ndarray) -> np.ndarray:
    """``m = 0; for s in v: if (s > m) m = s`` per row (a NaN never wins the comparison)."""
    m = np.where(np.isnan(v), F32(0), v).max(axis=1)
    return np.where(m > 0, m, F32(0)).astype(F32)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) values 0..3 -> (nb, 64): byte 32h + l holds L[128h + 32k + l] at bits 2k."""
    L4 = (L.astype(np.uint8) & 3).reshape(-1, 2, 4, 32)
    q = L4[:, :, 0] | (L4[:, :, 1] << 2) | (L4[:, :, 2] << 4) | (L4[:, :, 3] << 6)
    return q.reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_2bit`: (nb, 64) -> (nb, 256) values 0..3."""
    q = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)


def _per_weight(v: np.ndarray, sub: int) -> np.ndarray:
    """(nb, n_sub) per-sub-block values -> (nb, n_sub * sub) per weight."""
    return np.repeat(v, sub, axis=1)


def _requant(
    x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int
) -> np.ndarray:
    """Second pass with the stored (rounded) scales: ``L = clamp(round((x + dm) / d))``.

    ``x``/``L``: (nb, n_sub, sub); ``d``/``dm``: (nb, n_sub). Sub-blocks whose scale is 0 keep
    the L of the search, as the C ``if (!d) continue;`` does.
    """
    with np.errstate(all="ignore"):
        v = x + dm[..., None] if dm is not None else x
        lq = np.clip(nearest_int(v / d[..., None]), lo, hi) - lo
    return np.where((d != 0)[..., None], lq, L)


# --- Q2_K ------------------------------------------------------------------------------------


# Q2_K, 84 bytes per 256 weights (16 blocks of 16):
#   | scales[16]: low nibble = scale, high nibble = min | qs[64]: 2-bit quants (see _pack_2bit)
#   | d: fp16 | dmin: fp16 |          x = d * scale_j * q - dmin * min_j
# Matches quantize_row_q2_K_ref, quantize_row_q2_K_impl (imatrix), dequantize_row_q2_K.
class Q2_K(Codec, type_name="Q2_K"):
    """2-bit affine k-quant with 4-bit block scales and mins."""

    uses_imatrix = True

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        xs = x.reshape(-1, 16)
        scales, mins, L = _search.make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True, True)
        scales = scales.reshape(nb, 16)
        mins = mins.reshape(nb, 16)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        with np.errstate(all="ignore"):
            iscale = F32(15) / max_scale
            ls = nearest_int(iscale[:, None] * scales) & 0xFF
            imin = F32(15) / max_min
            lm = nearest_int(imin[:, None] * mins) & 0xFF
        sc = np.where((max_scale > 0)[:, None], ls, 0)
        d = np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(F32)
        sc = np.where((max_min > 0)[:, None], sc | ((lm << 4) & 0xFF), sc).astype(np.uint8)
        dmin = np.where(max_min > 0, max_min / F32(15), F32(0)).astype(F32)
        return self._finish(x, L.reshape(nb, 16, 16), sc, d, dmin)

    def quantize_blocks_imatrix(self, x: np.ndarray, qw: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        sigma2 = seq_sum_sq(x) / F32(QK_K)
        xs = x.reshape(nb, 16, 16)
        w = qw.reshape(nb, 16, 16) * np.sqrt(sigma2[:, None, None] + xs * xs)
        sw = seq_sum(w)  # (nb, 16)
        scales, mins, L = _search.make_qkx_quants(
            xs.reshape(-1, 16), w.reshape(-1, 16), 3, -0.9, 0.05, 36, False, False
        )
        dm, Ls = _search.make_qp_quants(scales.reshape(nb, 16), 15, sw)
        mm, Lm = _search.make_qp_quants(mins.reshape(nb, 16), 15, sw)
        sc = ((Ls | (Lm << 4)) & 0xFF).astype(np.uint8)
        return self._finish(x, L.reshape(nb, 16, 16), sc, dm, mm)

    def _finish(
        self, x: np.ndarray, L: np.ndarray, sc: np.ndarray, d: np.ndarray, dmin: np.ndarray
    ) -> np.ndarray:
        dq, mq = fp16_round(d), fp16_round(dmin)
        dd = dq[:, None] * (sc & 0xF).astype(F32)
        mm = mq[:, None] * (sc >> 4).astype(F32)
        L = _requant(x.reshape(-1, 16, 16), L, dd, mm, 0, 3)
        return np.concatenate(
            [sc, _pack_2bit(L.reshape(-1, QK_K)), _f16_bytes(d), _f16_bytes(dmin)], axis=1
        )

    code_range = (0, 3)

    @staticmethod
    def _scales(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dl, ml), each (nb, 16): ``d * (sc & 0xF)`` and ``dmin * (sc >> 4)``."""
        sc = q[:, :16]
        dl = _f16_at(q, 80)[:, None] * (sc & 0xF).astype(F32)
        ml = _f16_at(q, 82)[:, None] * (sc >> 4).astype(F32)
        return dl, ml

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d * sc_j, offset -dmin * m_j, codes 0..3 (ggml: ``dl * q - ml``, the same
        float)."""
        dl, ml = self._scales(q)
        return _per_weight(dl, 16), _per_weight(-ml, 16), 0, 3

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack_2bit(q[:, 16:80]).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, 16:80] = _pack_2bit(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        dl, ml = self._scales(q)
        L = self.codes(q).reshape(-1, 16, 16).astype(F32)
        return (dl[..., None] * L - ml[..., None]).reshape(-1, QK_K)


# --- Q3_K ------------------------------------------------------------------------------------


# Q3_K, 110 bytes per 256 weights (16 blocks of 16):
#   | hmask[32]: bit b of byte m = high bit of q[32b + m] | qs[64]: low 2 bits (see _pack_2bit)
#   | scales[12]: 16 six-bit scales, low nibbles in bytes 0-7, top 2 bits in bytes 8-11
#   | d: fp16 |          x = d * (scale_j - 32) * (q - 4)
# Matches quantize_row_q3_K_ref, quantize_row_q3_K_impl (imatrix), dequantize_row_q3_K.
class Q3_K(Codec, type_name="Q3_K"):
    """3-bit symmetric k-quant with 6-bit block scales."""

    uses_imatrix = True

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        scales, L = _search.make_q3_quants(x.reshape(-1, 16), 4)
        scales = scales.reshape(nb, 16)
        amax, max_scale = first_max_abs(scales)
        with np.errstate(all="ignore"):
            iscale = F32(-32) / max_scale
            l8 = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t cast
        ls = np.clip(l8, -32, 31) + 32
        live = max_scale != 0
        ls = np.where(live[:, None], ls, 0)
        with np.errstate(all="ignore"):
            d = np.where(live, F32(1) / iscale, F32(0)).astype(F32)
        return self._finish(x, L.reshape(nb, 16, 16), ls, d, live)

    def quantize_blocks_imatrix(self, x: np.ndarray, qw: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        sigma2 = F32(2) * seq_sum_sq(x) / F32(QK_K)
        xs = x.reshape(nb, 16, 16)
        w = qw.reshape(nb, 16, 16) * np.sqrt(sigma2[:, None, None] + xs * xs)
        sw = seq_sum(w)
        scales, L = _search.make_qx_quants(xs.reshape(-1, 16), 4, w.reshape(-1, 16))
        d, Ls = _search.make_qx_quants(scales.reshape(nb, 16), 32, sw)
        return self._finish(x, L.reshape(nb, 16, 16), Ls, d, np.ones(nb, bool))

    def _finish(
        self, x: np.ndarray, L: np.ndarray, ls: np.ndarray, d: np.ndarray, live: np.ndarray
    ) -> np.ndarray:
        nb = x.shape[0]
        ls = ls.astype(np.int32)
        sc = np.zeros((nb, 12), np.uint8)
        sc[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
        hi = (ls >> 4) & 0xFF
        for j in range(16):
            sc[:, 8 + j % 4] |= ((hi[:, j] << (2 * (j // 4))) & 0xFF).astype(np.uint8)
        sc = np.where(live[:, None], sc, 0).astype(np.uint8)
        sdec = _q3_scales(sc)  # what C reads back (equals ls - 32 when ls is 0..63)
        dd = fp16_round(d)[:, None] * sdec.astype(F32)
        L = _requant(x.reshape(-1, 16, 16), L, dd, None, -4, 3).reshape(nb, QK_K)
        return np.concatenate([_pack_q3(L), sc, _f16_bytes(d)], axis=1)

    code_range = (0, 7)

    @staticmethod
    def _scales(q: np.ndarray) -> np.ndarray:
        """dl = d * (sc_j - 32), (nb, 16)."""
        return _f16_at(q, 108)[:, None] * _q3_scales(q[:, 96:108]).astype(F32)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d * (sc_j - 32), offset -4 * scale, codes 0..7. ggml computes
        ``dl * (q - 4)``: the same float for a finite d (every product here is exact)."""
        scale = _per_weight(self._scales(q), 16)
        return scale, F32(-4) * scale, 0, 7

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack_q3(q[:, :96])

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, :96] = _pack_q3(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        nb = q.shape[0]
        L = (self.codes(q) - 4).reshape(nb, 16, 16).astype(F32)
        return (self._scales(q)[..., None] * L).reshape(nb, QK_K)


def _pack_q3(L: np.ndarray) -> np.ndarray:
    """(nb, 256) codes 0..7 -> (nb, 96): hmask (bit b of byte m = bit 2 of L[32b + m]), then
    the low 2 bits with :func:`_pack_2bit`."""
    L = L.astype(np.uint8)
    high = ((L >> 2) & 1).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    hmask = np.bitwise_or.reduce(high, axis=1)
    return np.concatenate([hmask, _pack_2bit(L & 3)], axis=1)


def _unpack_q3(qb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_q3`: (nb, 96) -> (nb, 256) int32 codes 0..7."""
    nb = qb.shape[0]
    bits = (qb[:, None, :32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _unpack_2bit(qb[:, 32:96]).astype(np.int32) | (
        bits.reshape(nb, QK_K).astype(np.int32) << 2
    )


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales of a Q3_K block, as int8 values (scale - 32)."""
    j = np.arange(16)
    low = np.where(j < 8, sc[:, j % 8] & 0xF, sc[:, j % 8] >> 4)
    top = (sc[:, 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    return ((low | (top << 4)).astype(np.int32) - 32).astype(np.int8)


# --- Q4_K / Q5_K shared -----------------------------------------------------------------------
# 12 bytes of scales for 8 blocks, six bits each of scale s_j and min m_j:
#   bytes 0-3:  s_0..s_3 (bits 0-5) | top 2 bits of s_4..s_7 (bits 6-7)
#   bytes 4-7:  m_0..m_3 (bits 0-5) | top 2 bits of m_4..m_7 (bits 6-7)
#   bytes 8-11: low nibble s_4..s_7 | low nibble m_4..m_7 << 4
def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    ls = ls.astype(np.int32) & 0xFF
    lm = lm.astype(np.int32) & 0xFF
    sc = np.empty((ls.shape[0], 12), np.int32)
    sc[:, 0:4] = ls[:, 0:4] | (((ls[:, 4:8] >> 4) << 6) & 0xFF)
    sc[:, 4:8] = lm[:, 0:4] | (((lm[:, 4:8] >> 4) << 6) & 0xFF)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return (sc & 0xFF).astype(np.uint8)


def _unpack_k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7 -> (scales, mins), each (nb, 8) uint8."""
    s = np.empty((sc.shape[0], 8), np.uint8)
    m = np.empty((sc.shape[0], 8), np.uint8)
    s[:, :4] = sc[:, 0:4] & 63
    m[:, :4] = sc[:, 4:8] & 63
    s[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return s, m


class _K4(Codec):
    """Q4_K and Q5_K: 8 blocks of 32, affine, 6-bit scales and mins."""

    uses_imatrix = True
    nmax: int
    ref_search: tuple[float, float, int]  # rmin, rdelta, nstep of the reference search
    clamp_imatrix_scales: bool  # quantize_row_q5_K_impl clamps Ls/Lm to 63, q4_K's does not

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        xs = x.reshape(-1, 32)
        sum_x2 = seq_sum_sq(xs)
        av_x = np.sqrt(sum_x2 / F32(32))
        w = av_x[:, None] + np.abs(xs)
        rmin, rdelta, nstep = self.ref_search
        scales, mins, L = _search.make_qkx_quants(
            xs, w, self.nmax, rmin, rdelta, nstep, False, True
        )
        scales = scales.reshape(nb, 8)
        mins = mins.reshape(nb, 8)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        with np.errstate(all="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
        d = max_scale / F32(63)
        dmin = max_min / F32(63)
        return self._finish(x, L.reshape(nb, 8, 32), _pack_k4_scales(ls, lm), d, dmin)

    def quantize_blocks_imatrix(self, x: np.ndarray, qw: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        sigma2 = F32(2) * seq_sum_sq(x) / F32(QK_K)
        xs = x.reshape(nb, 8, 32)
        w = qw.reshape(nb, 8, 32) * np.sqrt(sigma2[:, None, None] + xs * xs)
        sw = seq_sum(w)
        scales, mins, L = _search.make_qkx_quants(
            xs.reshape(-1, 32), w.reshape(-1, 32), self.nmax, -0.9, 0.05, 36, False, False
        )
        d, Ls = _search.make_qp_quants(scales.reshape(nb, 8), 63, sw)
        dmin, Lm = _search.make_qp_quants(mins.reshape(nb, 8), 63, sw)
        if self.clamp_imatrix_scales:
            Ls, Lm = np.minimum(63, Ls), np.minimum(63, Lm)
        return self._finish(x, L.reshape(nb, 8, 32), _pack_k4_scales(Ls, Lm), d, dmin)

    def _finish(
        self, x: np.ndarray, L: np.ndarray, sc: np.ndarray, d: np.ndarray, dmin: np.ndarray
    ) -> np.ndarray:
        s, m = _unpack_k4_scales(sc)
        dd = fp16_round(d)[:, None] * s.astype(F32)
        mm = fp16_round(dmin)[:, None] * m.astype(F32)
        L = _requant(x.reshape(-1, 8, 32), L, dd, mm, 0, self.nmax)
        head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), sc], axis=1)
        return np.concatenate([head, self._pack_quants(L.reshape(-1, 4, 2, 32))], axis=1)

    def _pack_quants(self, L: np.ndarray) -> np.ndarray:
        """(nb, 4, 2, 32) codes -> the quant bytes after the 16-byte header."""
        raise NotImplementedError

    def _unpack_quants(self, q: np.ndarray) -> np.ndarray:
        """Whole blocks -> (nb, 4, 2, 32) codes (inverse of :meth:`_pack_quants`)."""
        raise NotImplementedError

    @staticmethod
    def _scales(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(d1, m1), each (nb, 8): ``d * s_j`` and ``dmin * m_j``."""
        s, m = _unpack_k4_scales(q[:, 4:16])
        d1 = _f16_at(q, 0)[:, None] * s.astype(F32)
        m1 = _f16_at(q, 2)[:, None] * m.astype(F32)
        return d1, m1

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d * s_j, offset -dmin * m_j, codes 0..nmax (ggml: ``d1 * q - m1``, the same
        float)."""
        d1, m1 = self._scales(q)
        return _per_weight(d1, 32), _per_weight(-m1, 32), 0, self.nmax

    def codes(self, q: np.ndarray) -> np.ndarray:
        return self._unpack_quants(q).reshape(-1, QK_K).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, 16:] = self._pack_quants(c.reshape(-1, 4, 2, 32))
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        d1, m1 = self._scales(q)
        L = self.codes(q).reshape(-1, 8, 32).astype(F32)
        return (d1[..., None] * L - m1[..., None]).reshape(-1, QK_K)


# Q4_K, 144 bytes per 256 weights (8 blocks of 32):
#   | d: fp16 | dmin: fp16 | scales[12] (see _pack_k4_scales)
#   | qs[128]: byte 32c + l = q[64c + l] (low nibble) | q[64c + 32 + l] << 4 |
#   x = d * s_j * q - dmin * m_j
# Matches quantize_row_q4_K_ref, quantize_row_q4_K_impl (imatrix), dequantize_row_q4_K.
class Q4_K(_K4, type_name="Q4_K"):
    """4-bit affine k-quant."""

    nmax = 15
    code_range = (0, 15)
    ref_search = (-1.0, 0.1, 20)
    clamp_imatrix_scales = False

    def _pack_quants(self, L: np.ndarray) -> np.ndarray:
        L = L.astype(np.uint8)
        return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)

    def _unpack_quants(self, q: np.ndarray) -> np.ndarray:
        qs = q[:, 16:144].reshape(-1, 4, 1, 32)
        return np.concatenate([qs & 0xF, qs >> 4], axis=2)


# Q5_K, 176 bytes per 256 weights (8 blocks of 32):
#   | d: fp16 | dmin: fp16 | scales[12] (see _pack_k4_scales)
#   | qh[32]: bit 2c of byte l = bit 4 of q[64c + l], bit 2c+1 = bit 4 of q[64c + 32 + l]
#   | qs[128]: low nibbles laid out as Q4_K |
#   x = d * s_j * q - dmin * m_j
# Matches quantize_row_q5_K_ref, quantize_row_q5_K_impl (imatrix), dequantize_row_q5_K.
class Q5_K(_K4, type_name="Q5_K"):
    """5-bit affine k-quant."""

    nmax = 31
    code_range = (0, 31)
    ref_search = (-0.5, 0.1, 15)
    clamp_imatrix_scales = True

    def _pack_quants(self, L: np.ndarray) -> np.ndarray:
        L = L.astype(np.uint8)  # (nb, 4 chunks c, 2 halves, 32)
        hi = (L >> 4) & 1
        qh = np.zeros((L.shape[0], 32), np.uint8)
        for c in range(4):
            qh |= (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
        ql = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
        return np.concatenate([qh, ql], axis=1)

    def _unpack_quants(self, q: np.ndarray) -> np.ndarray:
        qh = q[:, 16:48].reshape(-1, 1, 1, 32)
        qs = q[:, 48:176].reshape(-1, 4, 1, 32)
        low = np.concatenate([qs & 0xF, qs >> 4], axis=2)
        shift = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
        return low | (((qh >> shift) & 1) << 4)


# --- Q6_K ------------------------------------------------------------------------------------


# Q6_K, 210 bytes per 256 weights (16 blocks of 16):
#   | ql[128]: byte 64h + 32k' + l: low nibble q[128h + 32k' + l], high nibble q[128h+64+32k'+l]
#   | qh[64]: byte 32h + l: bits 2k..2k+1 = bits 4-5 of q[128h + 32k + l]
#   | scales[16]: int8 | d: fp16 |          x = d * scale_j * (q - 32)
# Matches quantize_row_q6_K_ref, quantize_row_q6_K_impl (imatrix), dequantize_row_q6_K.
class Q6_K(Codec, type_name="Q6_K"):
    """6-bit symmetric k-quant with int8 block scales. The imatrix is used as the weights."""

    uses_imatrix = True

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        xs = x.reshape(-1, 16)
        return self._from_search(x, *_search.make_qx_quants(xs, 32, xs * xs))

    def quantize_blocks_imatrix(self, x: np.ndarray, qw: np.ndarray) -> np.ndarray:
        return self._from_search(
            x, *_search.make_qx_quants(x.reshape(-1, 16), 32, qw.reshape(-1, 16))
        )

    def _from_search(self, x: np.ndarray, scales: np.ndarray, L: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        scales = scales.reshape(nb, 16)
        amax, max_scale = first_max_abs(scales)
        live = amax >= GROUP_MAX_EPS
        with np.errstate(all="ignore"):
            iscale = F32(-128) / max_scale
            d = np.where(live, F32(1) / iscale, F32(0)).astype(F32)
            sc = np.minimum(127, nearest_int(iscale[:, None] * scales))
        sc = np.where(live[:, None], ((sc + 128) & 0xFF) - 128, 0).astype(np.int8)
        dd = fp16_round(d)[:, None] * sc.astype(F32)
        L = _requant(x.reshape(nb, 16, 16), L.reshape(nb, 16, 16), dd, None, -32, 31)
        L = np.where(live[:, None, None], L, 0)
        return np.concatenate([_pack_q6(L), sc.view(np.uint8), _f16_bytes(d)], axis=1)

    code_range = (0, 63)

    @staticmethod
    def _scales(q: np.ndarray) -> np.ndarray:
        """dl = d * sc_j, (nb, 16)."""
        return _f16_at(q, 208)[:, None] * q[:, 192:208].view(np.int8).astype(F32)

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """scale d * sc_j, offset -32 * scale, codes 0..63. ggml computes ``d * sc * (q - 32)``:
        the same float for a finite d (every product here is exact in float32)."""
        scale = _per_weight(self._scales(q), 16)
        return scale, F32(-32) * scale, 0, 63

    def codes(self, q: np.ndarray) -> np.ndarray:
        return _unpack_q6(q[:, :192])

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        c = self._checked_codes(q, codes)
        out = q.copy()
        out[:, :192] = _pack_q6(c)
        return out

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        nb = q.shape[0]
        L = (self.codes(q) - 32).reshape(nb, 16, 16).astype(F32)
        return (self._scales(q)[..., None] * L).reshape(nb, QK_K)


def _pack_q6(L: np.ndarray) -> np.ndarray:
    """(nb, 256) codes 0..63 (any shape holding them in order) -> (nb, 192): ql then qh."""
    L = L.astype(np.uint8).reshape(-1, 2, 4, 32)  # (h, k, l)
    ql = np.concatenate(
        [
            (L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
            (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(-1, 128)
    qh = (
        (L[:, :, 0] >> 4)
        | ((L[:, :, 1] >> 4) << 2)
        | ((L[:, :, 2] >> 4) << 4)
        | ((L[:, :, 3] >> 4) << 6)
    ).reshape(-1, 64)
    return np.concatenate([ql, qh], axis=1)


def _unpack_q6(qb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_q6`: (nb, 192) -> (nb, 256) int32 codes 0..63."""
    nb = qb.shape[0]
    ql = qb[:, :128].reshape(nb, 2, 2, 32)  # (h, k', l)
    qh = qb[:, 128:192].reshape(nb, 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # k = 0,1 low nibbles; 2,3 high
    top = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    return (low | (top << 4)).astype(np.int32).reshape(nb, QK_K)
