"""llama.cpp's scale searches, run on many (sub-)blocks at once: one row of ``x`` per lane.

Each function is the lane-parallel twin of a static helper in ``ggml-quants.c`` and returns what
it returns for every lane. Per-lane branches become masks; per-element sums run in C's order
(a Python loop over the 16 or 32 columns, each step a vector op over all lanes), because float32
addition is not associative and a pairwise sum would change the bytes.
"""

from __future__ import annotations

import numpy as np
from qtool.kernels._numeric import F32, first_max, first_max_abs, first_min, nearest_int

GROUP_MAX_EPS = F32(1e-15)


def _f(v: float) -> np.float32:
    return F32(v)


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search of ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``.

    ``w`` is the per-element weight (the caller passes ``x*x`` where C's ``qw`` is NULL).
    Returns (scale per lane, L in 0..2*nmax-1 as int32).
    """
    lanes, n = x.shape
    amax, vmax = first_max_abs(x)
    live = amax >= GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = _f(-nmax) / vmax
        wx = w * x
        lq = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lq.astype(F32)
        sumlx = np.zeros(lanes, F32)
        suml2 = np.zeros(lanes, F32)
        for i in range(n):
            sumlx += wx[:, i] * lf[:, i]
            suml2 += w[:, i] * lf[:, i] * lf[:, i]
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        L = lq + nmax
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(_f(nmax) + _f(0.1) * _f(step)) / vmax
            lq = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
            lf = lq.astype(F32)
            sumlx = np.zeros(lanes, F32)
            suml2 = np.zeros(lanes, F32)
            for i in range(n):
                sumlx += wx[:, i] * lf[:, i]
                suml2 += w[:, i] * lf[:, i] * lf[:, i]
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if take.any():
                L = np.where(take[:, None], lq + nmax, L)
                scale = np.where(take, sumlx / suml2, scale).astype(F32)
                best = np.where(take, scale * sumlx, best).astype(F32)
    L = np.where(live[:, None], L, 0)
    scale = np.where(live, scale, F32(0)).astype(F32)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: rmse-refined symmetric scale.

    Returns (scale per lane, L in 0..2*nmax-1 as int32).
    """
    lanes, n = x.shape
    amax, vmax = first_max_abs(x)
    live = amax >= GROUP_MAX_EPS
    rows = np.arange(lanes)
    with np.errstate(all="ignore"):
        iscale = _f(-nmax) / vmax
        L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        w = x * x
        wx = w * x
        lf = L.astype(F32)
        sumlx = np.zeros(lanes, F32)
        suml2 = np.zeros(lanes, F32)
        for i in range(n):
            sumlx += wx[:, i] * lf[:, i]
            suml2 += w[:, i] * lf[:, i] * lf[:, i]
        active = live.copy()
        for _ in range(5):
            changed = np.zeros(lanes, bool)
            for i in range(n):
                li = L[:, i].astype(F32)
                slx = sumlx - wx[:, i] * li
                ok = active & (slx > 0)
                if not ok.any():
                    continue
                sl2 = suml2 - w[:, i] * li * li
                new_l = np.clip(nearest_int(x[:, i] * sl2 / slx), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                ok &= new_l != L[:, i]
                slx2 = slx + wx[:, i] * nf
                sl22 = sl2 + w[:, i] * nf * nf
                ok &= (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[rows[ok], i] = new_l[ok]
                sumlx = np.where(ok, slx2, sumlx)
                suml2 = np.where(ok, sl22, suml2)
                changed |= ok
            # A lane that changed nothing would repeat itself; C stops it, so do we.
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = np.where(live[:, None], L + nmax, 0)
    scale = np.where(live, scale, F32(0)).astype(F32)
    return scale, L


def make_qkx_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    strict: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine (scale, min) search of ``make_qkx2_quants`` (``strict``) / ``make_qkx3_quants``.

    The two differ only in the degenerate test: ``max == min`` versus ``max <= min``.
    Returns (scale, the_min = -min, L in 0..nmax as int32), one per lane.
    """
    lanes, n = x.shape
    mn = first_min(x)
    mx = first_max(x)
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w += w[:, i]
        sum_x += w[:, i] * x[:, i]
    mn = np.where(mn > 0, F32(0), mn).astype(F32)
    dead = (mx == mn) if strict else (mx <= mn)
    rdelta_f, rmin_f, nmax_f = _f(rdelta), _f(rmin), _f(nmax)
    with np.errstate(all="ignore"):
        rng = mx - mn
        xm = x - mn[:, None]
        iscale = nmax_f / rng
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * xm), 0, nmax)
        best = _weighted_error(scale, mn, L, x, w, use_mad)
        for step in range(nstep + 1):
            # C updates `min` in place when a step wins, so later steps see the new one
            rng = mx - mn
            xm = x - mn[:, None]
            iscale = (rmin_f + rdelta_f * _f(step) + nmax_f) / rng
            la = np.clip(nearest_int(iscale[:, None] * xm), 0, nmax)
            lf = la.astype(F32)
            sum_l = np.zeros(lanes, F32)
            sum_l2 = np.zeros(lanes, F32)
            sum_xl = np.zeros(lanes, F32)
            for i in range(n):
                wl = w[:, i] * lf[:, i]
                sum_l += wl
                sum_l2 += wl * lf[:, i]
                sum_xl += wl * x[:, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min).astype(F32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F32)
            cur = _weighted_error(this_scale, this_min, la, x, w, use_mad)
            take = (D > 0) & (cur < best) & ~dead
            if take.any():
                L = np.where(take[:, None], la, L)
                best = np.where(take, cur, best)
                scale = np.where(take, this_scale, scale).astype(F32)
                mn = np.where(take, this_min, mn).astype(F32)
    L = np.where(dead[:, None], 0, L)
    scale = np.where(dead, F32(0), scale).astype(F32)
    return scale, -mn, L


def _weighted_error(
    scale: np.ndarray, mn: np.ndarray, L: np.ndarray, x: np.ndarray, w: np.ndarray, use_mad: bool
) -> np.ndarray:
    """``sum_i w[i] * f(scale*L[i] + min - x[i])`` in C's order, f = |.| or square."""
    diff = scale[:, None] * L.astype(F32) + mn[:, None] - x
    diff = np.abs(diff) if use_mad else diff * diff
    t = w * diff
    err = np.zeros(x.shape[0], F32)
    for i in range(x.shape[1]):
        err += t[:, i]
    return err


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: non-negative scale for the sub-scales.

    Returns (scale per lane, L as C's uint8 array holds it, as int32).
    """
    lanes, n = x.shape
    mx = np.zeros(lanes, F32)
    for i in range(n):  # MAX(max, x[i]) keeps x[i] on ties: mimic for the sign of zero
        mx = np.where(mx > x[:, i], mx, x[:, i]).astype(F32)
    live = mx >= GROUP_MAX_EPS
    rows = np.arange(lanes)
    with np.errstate(all="ignore"):
        iscale = _f(nmax) / mx
        L8 = nearest_int(iscale[:, None] * x) & 0xFF
        scale = F32(1) / iscale
        best = _qp_mse(x, scale, L8, qw)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (_f(0.1) * _f(step) + _f(nmax)) / mx
            scale_is = F32(1) / iscale_is
            lq = np.minimum(nmax, nearest_int(iscale_is[:, None] * x))
            mse = _qp_mse(x, scale_is, lq, qw)
            take = mse < best
            best = np.where(take, mse, best)
            iscale = np.where(take, iscale_is, iscale).astype(F32)
        lq = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        L8 = lq & 0xFF
        wx = qw * x
        lf = lq.astype(F32)
        sumlx = np.zeros(lanes, F32)
        suml2 = np.zeros(lanes, F32)
        for i in range(n):
            sumlx += wx[:, i] * lf[:, i]
            suml2 += qw[:, i] * lf[:, i] * lf[:, i]
        active = live.copy()
        for _ in range(5):
            changed = np.zeros(lanes, bool)
            for i in range(n):
                li = L8[:, i].astype(F32)
                slx = sumlx - wx[:, i] * li
                sl2 = suml2 - qw[:, i] * li * li
                ok = active & (slx > 0) & (sl2 > 0)
                if not ok.any():
                    continue
                new_l = np.minimum(nmax, nearest_int(x[:, i] * sl2 / slx))
                nf = new_l.astype(F32)
                ok &= new_l != L8[:, i]
                slx2 = slx + wx[:, i] * nf
                sl22 = sl2 + qw[:, i] * nf * nf
                ok &= slx2 * slx2 * suml2 > sumlx * sumlx * sl22
                L8[rows[ok], i] = new_l[ok] & 0xFF
                sumlx = np.where(ok, slx2, sumlx)
                suml2 = np.where(ok, sl22, suml2)
                changed |= ok
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L8 = np.where(live[:, None], L8, 0)
    scale = np.where(live, scale, F32(0)).astype(F32)
    return scale, L8


def _qp_mse(x: np.ndarray, scale: np.ndarray, L: np.ndarray, qw: np.ndarray) -> np.ndarray:
    diff = x - scale[:, None] * L.astype(F32)
    t = qw * diff * diff
    err = np.zeros(x.shape[0], F32)
    for i in range(x.shape[1]):
        err += t[:, i]
    return err
