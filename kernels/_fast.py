"""Compiled fast paths (numba) for the quantized types, with and without an importance matrix.

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K have one here (TQ1_0/TQ2_0 and the
float types use numpy only). These are ports of llama.cpp's scalar C in float32, each sum
seeing the same operations in the same order; numba (LLVM) never contracts ``a*b + c`` into an
FMA unless asked to (no fastmath here), which matches libggml-base: llama-cpp-python builds it
with ``-O3`` and no ``-march`` (only ggml-cpu gets ``-march=native``), and ``objdump -d`` finds
no ``vfmadd`` in it. What makes them faster than the C while staying bit-identical:

* the scale searches run on many (sub-)blocks at once, element-major ("lanes"), so every
  inner loop runs across independent blocks and vectorises, while each block still sums its
  own elements in C's order -- the C is one block at a time with serial float dependencies;
* ``nearest_int`` goes through an int32 view of a float32 scratch array, as the C bit trick;
* rows are independent and the kernels release the GIL, so threads scale.

The first call of each entry point compiles it (tens of seconds, once: ``cache=True`` keeps the
machine code under ``__pycache__``). ``AVAILABLE`` is False when numba is absent; the numpy
path then runs.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

AVAILABLE = numba is not None

F32 = np.float32
_F0 = F32(0.0)
_F1 = F32(1.0)
_F0_1 = F32(0.1)
_MAGIC = F32(12582912.0)
_EPS = F32(1e-15)
_BIG = F32(4194303.0)


def _jit(**kw):  # type: ignore[no-untyped-def]
    def wrap(fn):  # type: ignore[no-untyped-def]
        if numba is None:
            return fn
        return numba.njit(cache=True, nogil=True, error_model="numpy", **kw)(fn)

    return wrap


# --- scalar helpers --------------------------------------------------------------------------


@_jit()
def _nearest_int(v):  # type: ignore[no-untyped-def]
    """llama.cpp's nearest_int for one float32, exact for every input."""
    if abs(v) <= _BIG:
        return np.int32(np.rint(v))
    t = F32(v + _MAGIC)
    if t != t:
        return np.int32(0)
    a = abs(np.float64(t))
    if a == np.inf or a == 0.0:
        return np.int32(-0x400000)
    m, e = math.frexp(a)
    if e <= -126:
        bits = np.int64(a * 2.0**149)
    else:
        bits = np.int64((2.0 * m - 1.0) * 8388608.0)
    return np.int32((bits & 0x7FFFFF) - 0x400000)


@_jit()
def _cvtt(v):  # type: ignore[no-untyped-def]
    """C's float -> int conversion as x86 does it (cvttss2si): truncate; NaN/overflow -> INT_MIN."""
    if not (abs(v) < 2147483648.0):
        return np.int64(-2147483648)
    return np.int64(v)


@_jit()
def _f16_bits(v):  # type: ignore[no-untyped-def]
    """float32 -> IEEE half bits, round to nearest even (what GGML_FP32_TO_FP16 gives)."""
    a = abs(np.float64(v))
    sign = 0x8000 if math.copysign(1.0, np.float64(v)) < 0 else 0
    if a != a:
        return np.uint16(sign | 0x7E00)
    if a >= 65520.0:
        return np.uint16(sign | 0x7C00)
    if a < 6.103515625e-05:  # below 2**-14: subnormal half, a multiple of 2**-24
        return np.uint16(sign | np.int64(np.rint(a * 16777216.0)))
    m, e = math.frexp(a)
    mant = np.int64(np.rint((2.0 * m - 1.0) * 1024.0))
    return np.uint16(sign | (((e + 14) << 10) + mant))


@_jit()
def _f16_value(h):  # type: ignore[no-untyped-def]
    """IEEE half bits -> float32 (a scale that overflowed fp16 reads back as inf, as in C)."""
    h = np.int64(h)
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if e == 0:
        v = mant * 2.0**-24
    elif e == 31:
        v = np.inf if mant == 0 else np.nan
    else:
        v = (1024 + mant) * 2.0 ** (e - 25)
    if h & 0x8000:
        v = -v
    return F32(v)


@_jit()
def _put_f16(out, at, v):  # type: ignore[no-untyped-def]
    """Store fp16(v) little-endian at out[at:at+2]; return the value it reads back as."""
    h = _f16_bits(v)
    out[at] = np.uint8(h & 0xFF)
    out[at + 1] = np.uint8(h >> 8)
    return _f16_value(h)


# --- searches (float32 ports of the ggml-quants.c helpers) -----------------------------------


@_jit()
def _qkx_lanes(X, W, nl, n, nmax, rmin, rdelta, nstep, use_mad, strict, L, scl, tmin, st, laux):  # type: ignore[no-untyped-def]
    """make_qkx2_quants (strict) / make_qkx3_quants on nl lanes at once.

    X, W, L: (n, nl) flattened, element-major so each inner loop runs across lanes (and
    vectorises) while every lane still sums its own elements in C's order. Writes L, scl (the
    scale) and tmin (the_min). ``st`` is a (16, nl) float32 scratch.
    """
    mn = st[0]
    mx = st[1]
    sw = st[2]
    sx = st[3]
    best = st[4]
    iscale = st[5]
    sl = st[6]
    sl2 = st[7]
    sxl = st[8]
    ts = st[9]
    tm = st[10]
    cur = st[11]
    tf = st[12]
    ti = tf.view(np.int32)
    take = st[13].view(np.int32)
    dead = st[14].view(np.int32)
    fnmax = F32(nmax)
    for k in range(nl):
        mn[k] = X[k]
        mx[k] = X[k]
        sw[k] = W[k]
        sx[k] = W[k] * X[k]
    for i in range(1, n):
        b = i * nl
        for k in range(nl):
            v = X[b + k]
            w = W[b + k]
            mn[k] = v if v < mn[k] else mn[k]
            mx[k] = v if v > mx[k] else mx[k]
            sw[k] += w
            sx[k] += w * v
    for k in range(nl):
        if mn[k] > 0:
            mn[k] = _F0
        dd = (mx[k] == mn[k]) if strict else (mx[k] <= mn[k])
        dead[k] = 1 if dd else 0
        iscale[k] = fnmax / (mx[k] - mn[k])
        scl[k] = _F1 / iscale[k]
        best[k] = _F0
    for i in range(n):
        b = i * nl
        for k in range(nl):
            tf[k] = iscale[k] * (X[b + k] - mn[k]) + _MAGIC
        for k in range(nl):
            li = (ti[k] & 0x7FFFFF) - 0x400000
            li = max(0, min(nmax, li))
            L[b + k] = li
            diff = scl[k] * F32(li) + mn[k] - X[b + k]
            diff = abs(diff) if use_mad else diff * diff
            best[k] += W[b + k] * diff
    for step in range(nstep + 1):
        fs = rmin + rdelta * F32(step) + fnmax
        for k in range(nl):
            iscale[k] = fs / (mx[k] - mn[k])
            sl[k] = _F0
            sl2[k] = _F0
            sxl[k] = _F0
        for i in range(n):
            b = i * nl
            for k in range(nl):
                tf[k] = iscale[k] * (X[b + k] - mn[k]) + _MAGIC
            for k in range(nl):
                li = (ti[k] & 0x7FFFFF) - 0x400000
                li = max(0, min(nmax, li))
                laux[b + k] = li
                fl = F32(li)
                wl = W[b + k] * fl
                sl[k] += wl
                sl2[k] += wl * fl
                sxl[k] += wl * X[b + k]
        for k in range(nl):
            D = sw[k] * sl2[k] - sl[k] * sl[k]
            a = (sw[k] * sxl[k] - sx[k] * sl[k]) / D
            m = (sl2[k] * sx[k] - sl[k] * sxl[k]) / D
            if m > 0:
                m = _F0
                a = sxl[k] / sl2[k]
            ts[k] = a
            tm[k] = m
            take[k] = 1 if (D > 0 and dead[k] == 0) else 0
            cur[k] = _F0
        for i in range(n):
            b = i * nl
            for k in range(nl):
                diff = ts[k] * F32(laux[b + k]) + tm[k] - X[b + k]
                diff = abs(diff) if use_mad else diff * diff
                cur[k] += W[b + k] * diff
        for k in range(nl):
            t = take[k] == 1 and cur[k] < best[k]
            take[k] = 1 if t else 0
            if t:
                best[k] = cur[k]
                scl[k] = ts[k]
                mn[k] = tm[k]
        for i in range(n):
            b = i * nl
            for k in range(nl):
                if take[k] == 1:
                    L[b + k] = laux[b + k]
    for k in range(nl):
        tmin[k] = -mn[k]
        if dead[k] == 1:
            scl[k] = _F0
    for i in range(n):
        b = i * nl
        for k in range(nl):
            if dead[k] == 1:
                L[b + k] = 0


@_jit()
def _qx_lanes(X, W, nl, n, nmax, L, scl, st, laux):  # type: ignore[no-untyped-def]
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) on nl lanes, weights W (x*x for qw NULL).

    Layout as in :func:`_qkx_lanes`. Writes L (levels + nmax) and scl.
    """
    amax = st[0]
    vmax = st[1]
    iscale = st[2]
    slx = st[3]
    sl2 = st[4]
    best = st[5]
    tf = st[6]
    ti = tf.view(np.int32)
    flag = st[7]
    fnmax = F32(nmax)
    for k in range(nl):
        amax[k] = _F0
        vmax[k] = _F0
    for i in range(n):
        b = i * nl
        for k in range(nl):
            ax = abs(X[b + k])
            t = ax > amax[k]
            amax[k] = ax if t else amax[k]
            vmax[k] = X[b + k] if t else vmax[k]
    for k in range(nl):
        iscale[k] = F32(-nmax) / vmax[k]
        slx[k] = _F0
        sl2[k] = _F0
    for i in range(n):
        b = i * nl
        for k in range(nl):
            tf[k] = iscale[k] * X[b + k] + _MAGIC
        for k in range(nl):
            li = (ti[k] & 0x7FFFFF) - 0x400000
            li = max(-nmax, min(nmax - 1, li))
            L[b + k] = li + nmax
            xi = X[b + k]
            wi = W[b + k]
            fl = F32(li)
            slx[k] += wi * xi * fl
            sl2[k] += wi * fl * fl
    for k in range(nl):
        s = slx[k] / sl2[k] if sl2[k] != 0 else _F0
        scl[k] = s
        best[k] = s * slx[k]
    for step in range(-9, 10):
        if step == 0:
            continue
        fs = -(fnmax + _F0_1 * F32(step))
        for k in range(nl):
            iscale[k] = fs / vmax[k]
            slx[k] = _F0
            sl2[k] = _F0
        for i in range(n):
            b = i * nl
            for k in range(nl):
                tf[k] = iscale[k] * X[b + k] + _MAGIC
            for k in range(nl):
                li = (ti[k] & 0x7FFFFF) - 0x400000
                li = max(-nmax, min(nmax - 1, li))
                laux[b + k] = li + nmax
                xi = X[b + k]
                wi = W[b + k]
                fl = F32(li)
                slx[k] += wi * xi * fl
                sl2[k] += wi * fl * fl
        any_take = False
        for k in range(nl):
            t = sl2[k] > 0 and slx[k] * slx[k] > best[k] * sl2[k]
            if t:
                s = slx[k] / sl2[k]
                scl[k] = s
                best[k] = s * slx[k]
                any_take = True
            flag[k] = _F1 if t else _F0
        if any_take:
            for i in range(n):
                b = i * nl
                for k in range(nl):
                    if flag[k] != 0:
                        L[b + k] = laux[b + k]
    for k in range(nl):
        if amax[k] < _EPS:
            scl[k] = _F0
    for i in range(n):
        b = i * nl
        for k in range(nl):
            if amax[k] < _EPS:
                L[b + k] = 0


@_jit()
def _qp(x, n, nmax, qw, L):  # type: ignore[no-untyped-def]
    """make_qp_quants(n, nmax, x, L, quant_weights); L holds what C's uint8 array holds."""
    mx = _F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = F32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i]) & 0xFF
    scale = _F1 / iscale
    best = _F0
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_F0_1 * F32(step) + fnmax) / mx
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            li = min(nmax, _nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F32(li)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        li = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = li & 0xFF
        sumlx += qw[i] * x[i] * F32(li)
        suml2 += qw[i] * F32(li) * F32(li)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            fl = F32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = F32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _F0


# --- Q8_0 ------------------------------------------------------------------------------------


@_jit()
def q8_0_rows(rows, qw, out):  # type: ignore[no-untyped-def]
    """quantize_row_q8_0_ref over each row (the imatrix is unused, as in llama.cpp)."""
    r, n = rows.shape
    nb = n // 32
    for row in range(r):
        x = rows[row]
        y = out[row]
        for b in range(nb):
            o = 32 * b
            amax = _F0
            for j in range(32):
                amax = max(amax, abs(x[o + j]))
            d = amax / F32(127)
            idv = _F1 / d if d != 0 else _F0
            _put_f16(y, 34 * b, d)
            if abs(idv) < F32(3.0e38):
                # |x * id| <= 127.00001 here: roundf is trunc(|v| + 0.5) with the sign back on
                # (exact in float64), and the loop vectorises.
                for j in range(32):
                    v = np.float64(x[o + j] * idv)
                    q = np.int32(abs(v) + 0.5)
                    y[34 * b + 2 + j] = np.uint8((-q if v < 0 else q) & 0xFF)
            else:  # d subnormal, 1/d = inf: x*inf -> roundf -> x86's (int8_t) of +-inf/NaN
                for j in range(32):
                    v = np.float64(x[o + j] * idv)
                    q = math.floor(abs(v) + 0.5)
                    y[34 * b + 2 + j] = np.uint8(_cvtt(-q if v < 0 else q) & 0xFF)


# --- Q4_K / Q5_K -----------------------------------------------------------------------------


@_jit()
def _k4_scale_min(sc, j):  # type: ignore[no-untyped-def]
    """get_scale_min_k4 on the 12 scale bytes at sc[0:12]."""
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


_G = 8  # super-blocks searched together: 64 lanes of 32 (Q4_K/Q5_K) or 128 of 16 (Q6_K)


@_jit()
def _k4_rows(rows, qw, out, nmax):  # type: ignore[no-untyped-def]
    """Q4_K (nmax 15) / Q5_K (nmax 31) over rows; the imatrix path when qw is non-empty."""
    r, n = rows.shape
    nb = n // 256
    total = r * nb
    weighted = qw.shape[0] > 0
    tsize = 144 if nmax == 15 else 176
    xb = rows.reshape(total, 256)
    yb = out.reshape(total, tsize)
    nl_max = 8 * _G
    X = np.empty(32 * nl_max, np.float32)
    W = np.empty(32 * nl_max, np.float32)
    L = np.empty(32 * nl_max, np.int32)
    laux = np.empty(32 * nl_max, np.int32)
    scl = np.empty(nl_max, np.float32)
    tmin = np.empty(nl_max, np.float32)
    st = np.empty((16, nl_max), np.float32)
    sw = np.empty(nl_max, np.float32)
    ls = np.empty(8, np.int32)
    lm = np.empty(8, np.int32)
    lb = np.empty(256, np.int32)
    tf = np.empty(32, np.float32)
    ti = tf.view(np.int32)
    if weighted:
        rmin, rdelta, nstep, strict = F32(-0.9), F32(0.05), 36, False
    elif nmax == 15:
        rmin, rdelta, nstep, strict = F32(-1.0), _F0_1, 20, True
    else:
        rmin, rdelta, nstep, strict = F32(-0.5), _F0_1, 15, True
    for g0 in range(0, total, _G):
        gn = min(_G, total - g0)
        nl = 8 * gn
        # Lane k = 8g + j is block j of super-block g; element i of it sits at X[i*nl + k].
        for g in range(gn):
            x = xb[g0 + g]
            if weighted:
                s2 = _F0
                for i in range(256):
                    s2 += x[i] * x[i]
                sigma2 = F32(2) * s2 / F32(256)
                qo = 256 * ((g0 + g) % nb)
                for j in range(8):
                    for i in range(32):
                        v = x[32 * j + i]
                        X[i * nl + 8 * g + j] = v
                        W[i * nl + 8 * g + j] = qw[qo + 32 * j + i] * np.sqrt(sigma2 + v * v)
            else:
                for j in range(8):
                    for i in range(32):
                        X[i * nl + 8 * g + j] = x[32 * j + i]
        if weighted:
            for k in range(nl):
                sw[k] = _F0
            for i in range(32):
                for k in range(nl):
                    sw[k] += W[i * nl + k]
        else:
            av = st[0]
            for k in range(nl):
                av[k] = _F0
            for i in range(32):
                for k in range(nl):
                    av[k] += X[i * nl + k] * X[i * nl + k]
            for k in range(nl):
                av[k] = np.sqrt(av[k] / F32(32))
            for i in range(32):
                for k in range(nl):
                    W[i * nl + k] = av[k] + abs(X[i * nl + k])
        _qkx_lanes(X, W, nl, 32, nmax, rmin, rdelta, nstep, False, strict, L, scl, tmin, st, laux)
        for g in range(gn):
            x = xb[g0 + g]
            y = yb[g0 + g]
            y[:] = 0
            sc8 = scl[8 * g : 8 * g + 8]
            mn8 = tmin[8 * g : 8 * g + 8]
            if weighted:
                d = _qp(sc8, 8, 63, sw[8 * g : 8 * g + 8], ls)
                dmin = _qp(mn8, 8, 63, sw[8 * g : 8 * g + 8], lm)
                if nmax == 31:  # quantize_row_q5_K_impl clamps to 63, q4_K's does not
                    for j in range(8):
                        ls[j] = min(63, ls[j])
                        lm[j] = min(63, lm[j])
            else:
                max_scale = _F0
                max_min = _F0
                for j in range(8):
                    if sc8[j] > max_scale:
                        max_scale = sc8[j]
                    if mn8[j] > max_min:
                        max_min = mn8[j]
                inv_scale = F32(63) / max_scale if max_scale > 0 else _F0
                inv_min = F32(63) / max_min if max_min > 0 else _F0
                for j in range(8):
                    ls[j] = min(63, _nearest_int(inv_scale * sc8[j]) & 0xFF)
                    lm[j] = min(63, _nearest_int(inv_min * mn8[j]) & 0xFF)
                d = max_scale / F32(63)
                dmin = max_min / F32(63)
            sc = y[4:16]
            for j in range(8):
                a = ls[j] & 0xFF
                c = lm[j] & 0xFF
                if j < 4:
                    sc[j] = a
                    sc[j + 4] = c
                else:
                    sc[j + 4] = (a & 0xF) | ((c & 0xF) << 4)
                    sc[j - 4] |= ((a >> 4) << 6) & 0xFF
                    sc[j] |= ((c >> 4) << 6) & 0xFF
            dq = _put_f16(y, 0, d)
            mq = _put_f16(y, 2, dmin)
            for j in range(8):
                for i in range(32):
                    lb[32 * j + i] = L[i * nl + 8 * g + j]
                s, m = _k4_scale_min(sc, j)
                dd = dq * F32(s)
                if dd == 0:
                    continue
                dm = mq * F32(m)
                for i in range(32):
                    tf[i] = (x[32 * j + i] + dm) / dd + _MAGIC
                for i in range(32):
                    li = (ti[i] & 0x7FFFFF) - 0x400000
                    lb[32 * j + i] = max(0, min(nmax, li))
            if nmax == 15:
                for c in range(4):
                    for i in range(32):
                        y[16 + 32 * c + i] = lb[64 * c + i] | (lb[64 * c + 32 + i] << 4)
            else:
                for c in range(4):
                    for i in range(32):
                        l1 = lb[64 * c + i]
                        l2 = lb[64 * c + 32 + i]
                        y[16 + i] |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1))
                        y[48 + 32 * c + i] = (l1 & 0xF) | ((l2 & 0xF) << 4)


# --- Q6_K ------------------------------------------------------------------------------------


@_jit()
def _q6_k_rows(rows, qw, out):  # type: ignore[no-untyped-def]
    """quantize_row_q6_K_ref, or quantize_row_q6_K_impl when qw (the imatrix) is non-empty."""
    r, n = rows.shape
    nb = n // 256
    total = r * nb
    weighted = qw.shape[0] > 0
    xb = rows.reshape(total, 256)
    yb = out.reshape(total, 210)
    nl_max = 16 * _G
    X = np.empty(16 * nl_max, np.float32)
    W = np.empty(16 * nl_max, np.float32)
    L = np.empty(16 * nl_max, np.int32)
    laux = np.empty(16 * nl_max, np.int32)
    scl = np.empty(nl_max, np.float32)
    st = np.empty((16, nl_max), np.float32)
    lb = np.empty(256, np.int32)
    tf = np.empty(16, np.float32)
    ti = tf.view(np.int32)
    for g0 in range(0, total, _G):
        gn = min(_G, total - g0)
        nl = 16 * gn
        for g in range(gn):
            x = xb[g0 + g]
            qo = 256 * ((g0 + g) % nb)
            for j in range(16):
                for i in range(16):
                    v = x[16 * j + i]
                    X[i * nl + 16 * g + j] = v
                    # quantize_row_q6_K_ref weighs by x*x; the imatrix path by the imatrix alone
                    W[i * nl + 16 * g + j] = qw[qo + 16 * j + i] if weighted else v * v
        _qx_lanes(X, W, nl, 16, 32, L, scl, st, laux)
        for g in range(gn):
            x = xb[g0 + g]
            y = yb[g0 + g]
            y[:] = 0
            max_scale = _F0
            max_abs = _F0
            for j in range(16):
                s = scl[16 * g + j]
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
            if max_abs < _EPS:
                continue
            iscale = F32(-128) / max_scale
            dq = _put_f16(y, 208, _F1 / iscale)
            for j in range(16):
                for i in range(16):
                    lb[16 * j + i] = L[i * nl + 16 * g + j]
                q = min(127, _nearest_int(iscale * scl[16 * g + j]))
                q8 = ((q + 128) & 0xFF) - 128
                y[192 + j] = q8 & 0xFF
                dd = dq * F32(q8)
                if dd == 0:
                    continue
                for i in range(16):
                    tf[i] = x[16 * j + i] / dd + _MAGIC
                for i in range(16):
                    li = (ti[i] & 0x7FFFFF) - 0x400000
                    lb[16 * j + i] = max(-32, min(31, li)) + 32
            for h in range(2):
                for i in range(32):
                    l0 = lb[128 * h + i]
                    l1 = lb[128 * h + 32 + i]
                    l2 = lb[128 * h + 64 + i]
                    l3 = lb[128 * h + 96 + i]
                    y[64 * h + i] = (l0 & 0xF) | ((l2 & 0xF) << 4)
                    y[64 * h + 32 + i] = (l1 & 0xF) | ((l3 & 0xF) << 4)
                    y[128 + 32 * h + i] = (
                        (l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4) | ((l3 >> 4) << 6)
                    )


# --- Q4_0 / Q4_1 / Q5_0 / Q5_1 ---------------------------------------------------------------
# kind: 0 = Q4_0, 1 = Q4_1, 2 = Q5_0, 3 = Q5_1 (bits = 4 + kind // 2, affine = kind % 2)


@_jit()
def _legacy_ref_block(x, o, L, kind):  # type: ignore[no-untyped-def]
    """quantize_row_q{4,5}_{0,1}_ref for one block -> (d, m); levels into L[0:32]."""
    if kind % 2 == 0:
        amax = _F0
        vmax = _F0
        for j in range(32):
            if amax < abs(x[o + j]):
                amax = abs(x[o + j])
                vmax = x[o + j]
        d = vmax / (F32(-8) if kind == 0 else F32(-16))
        idv = _F1 / d if d != 0 else _F0
        off = F32(8.5) if kind == 0 else F32(16.5)
        top = 15 if kind == 0 else 31
        mn = _F0
    else:
        mn = F32(np.inf)
        mx = F32(-np.inf)
        for j in range(32):  # C starts from +-FLT_MAX; the same for finite input
            v = x[o + j]
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        d = (mx - mn) / (F32(15) if kind == 1 else F32(31))
        idv = _F1 / d if d != 0 else _F0
        off = F32(0.5)
        top = 15 if kind == 1 else 255  # Q5_1 casts to uint8 without a MIN
    if abs(idv) < F32(3.0e38) and abs(d) < F32(3.0e38):
        # Everything finite and in range, so the C casts are plain truncations (this loop
        # vectorises).
        for j in range(32):
            L[j] = min(top, np.int32((x[o + j] - mn) * idv + off))
    else:
        # 1/d or max - min overflowed: x*inf is +-inf or NaN, and x86's cvttss2si gives
        # INT_MIN, whose low byte is 0 -- emulate the (int8_t)/(uint8_t) cast exactly.
        for j in range(32):
            t = (x[o + j] - mn) * idv + off
            q = ((_cvtt(t) + 128) & 0xFF) - 128
            L[j] = (min(top, q) if kind != 3 else q) & 0xFF
    return d, mn


@_jit()
def _legacy_pack(y, yo, kind, d, m, L):  # type: ignore[no-untyped-def]
    """| d | m (affine) | qh u32 (5-bit) | 16 bytes: L[j] | L[j+16] << 4 |."""
    _put_f16(y, yo, d)
    p = yo + 2
    if kind % 2 == 1:
        _put_f16(y, p, m)
        p += 2
    if kind >= 2:
        qh = 0
        for j in range(32):
            qh |= ((L[j] >> 4) & 1) << j
        for k in range(4):
            y[p + k] = (qh >> (8 * k)) & 0xFF
        p += 4
    for j in range(16):
        y[p + j] = (L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4)


@_jit()
def _legacy_ref_lanes(X, nl, kind, L, dd, mm, ok, st):  # type: ignore[no-untyped-def]
    """quantize_row_q{4,5}_{0,1}_ref on nl lanes (blocks): d, m and levels.

    ``ok[k]`` is 0 where 1/d or max - min overflowed; the caller redoes those blocks with the
    exact scalar emulation of the C casts (:func:`_legacy_ref_block`).
    """
    a_ = st[0]
    v_ = st[1]
    idv = st[2]
    if kind % 2 == 0:
        for k in range(nl):
            a_[k] = _F0
            v_[k] = _F0
        for j in range(32):
            b = j * nl
            for k in range(nl):
                ax = abs(X[b + k])
                t = a_[k] < ax
                a_[k] = ax if t else a_[k]
                v_[k] = X[b + k] if t else v_[k]
        div = F32(-8) if kind == 0 else F32(-16)
        for k in range(nl):
            dd[k] = v_[k] / div
            mm[k] = _F0
    else:
        for k in range(nl):
            a_[k] = F32(np.inf)
            v_[k] = F32(-np.inf)
        for j in range(32):
            b = j * nl
            for k in range(nl):
                v = X[b + k]
                a_[k] = v if v < a_[k] else a_[k]
                v_[k] = v if v > v_[k] else v_[k]
        div = F32(15) if kind == 1 else F32(31)
        for k in range(nl):
            dd[k] = (v_[k] - a_[k]) / div
            mm[k] = a_[k]
    for k in range(nl):
        idv[k] = _F1 / dd[k] if dd[k] != 0 else _F0
        ok[k] = 1 if (abs(idv[k]) < F32(3.0e38) and abs(dd[k]) < F32(3.0e38)) else 0
    off = (F32(8.5), F32(0.5), F32(16.5), F32(0.5))[kind]
    top = (15, 15, 31, 255)[kind]  # Q5_1 casts to uint8 without a MIN
    for j in range(32):
        b = j * nl
        for k in range(nl):
            # in range wherever ok[k]: the C casts are plain truncations there
            t = (X[b + k] - mm[k]) * idv[k] + off
            t = t if ok[k] == 1 else _F0
            L[b + k] = min(top, np.int32(t))


@_jit()
def _legacy_rows(rows, qw, out, kind):  # type: ignore[no-untyped-def]
    r, n = rows.shape
    nb = n // 32
    tsize = (18, 20, 22, 24)[kind]
    weighted = qw.shape[0] > 0
    nmax = (8, 15, 16, 31)[kind]
    total = r * nb
    xb = rows.reshape(total, 32)
    nl_max = 64
    X = np.empty(32 * nl_max, np.float32)
    W = np.empty(32 * nl_max, np.float32)
    LL = np.empty(32 * nl_max, np.int32)
    laux = np.empty(32 * nl_max, np.int32)
    scl = np.empty(nl_max, np.float32)
    tmin = np.empty(nl_max, np.float32)
    ok = np.empty(nl_max, np.int32)
    st = np.empty((16, nl_max), np.float32)
    L = np.empty(32, np.int32)
    sigma2 = np.empty(r, np.float32)
    if weighted:
        # quantize_row_q{4,5}_{0,1}_impl: weights from the row's mean square, then the search
        for row in range(r):
            s2 = _F0
            for j in range(n):
                s2 += rows[row, j] * rows[row, j]
            sigma2[row] = s2 / F32(n)
    for g0 in range(0, total, nl_max):
        nl = min(nl_max, total - g0)
        for k in range(nl):
            bi = g0 + k
            for i in range(32):
                X[i * nl + k] = xb[bi, i]
            if weighted:
                s2 = sigma2[bi // nb]
                qo = 32 * (bi % nb)
                for i in range(32):
                    v = xb[bi, i]
                    W[i * nl + k] = qw[qo + i] * np.sqrt(s2 + v * v)
        if not weighted:
            _legacy_ref_lanes(X, nl, kind, LL, scl, tmin, ok, st)
        elif kind % 2 == 0:
            _qx_lanes(X, W, nl, 32, nmax, LL, scl, st, laux)
        else:
            _qkx_lanes(
                X, W, nl, 32, nmax, F32(-0.9), F32(0.05), 36, False, False, LL, scl, tmin, st, laux
            )
        for k in range(nl):
            bi = g0 + k
            if not weighted and ok[k] == 0:
                d, m = _legacy_ref_block(xb[bi], 0, L, kind)
            else:
                for i in range(32):
                    L[i] = LL[i * nl + k]
                d = scl[k]
                if weighted:
                    m = -tmin[k] if kind % 2 == 1 else _F0
                else:
                    m = tmin[k]
            _legacy_pack(out[bi // nb], tsize * (bi % nb), kind, d, m, L)


# --- Q2_K / Q3_K -----------------------------------------------------------------------------


@_jit()
def _q3_lanes(X, nl, n, nmax, L, scl, st):  # type: ignore[no-untyped-def]
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on nl lanes (layout as in _qkx_lanes).

    The coordinate-descent passes are sequential within a lane, so the element loop is outside
    and the lane loop inside; a lane whose pass changed nothing stops, as C's loop does.
    """
    amax = st[0]
    vmax = st[1]
    slx = st[2]
    sl2 = st[3]
    iscale = st[4]
    t1 = st[5]
    t2 = st[6]
    tf = st[7]
    ti = tf.view(np.int32)
    active = st[8].view(np.int32)
    changed = st[9].view(np.int32)
    for k in range(nl):
        amax[k] = _F0
        vmax[k] = _F0
        slx[k] = _F0
        sl2[k] = _F0
    for i in range(n):
        b = i * nl
        for k in range(nl):
            ax = abs(X[b + k])
            t = ax > amax[k]
            amax[k] = ax if t else amax[k]
            vmax[k] = X[b + k] if t else vmax[k]
    for k in range(nl):
        iscale[k] = F32(-nmax) / vmax[k]
        active[k] = 1 if amax[k] >= _EPS else 0
    for i in range(n):
        b = i * nl
        for k in range(nl):
            tf[k] = iscale[k] * X[b + k] + _MAGIC
        for k in range(nl):
            li = max(-nmax, min(nmax - 1, (ti[k] & 0x7FFFFF) - 0x400000))
            L[b + k] = li
            x = X[b + k]
            w = x * x
            slx[k] += w * x * F32(li)
            sl2[k] += w * F32(li) * F32(li)
    for _ in range(5):
        for k in range(nl):
            changed[k] = 0
        for i in range(n):
            b = i * nl
            for k in range(nl):
                x = X[b + k]
                w = x * x
                fl = F32(L[b + k])
                a = slx[k] - w * x * fl
                c = sl2[k] - w * fl * fl
                t1[k] = a
                t2[k] = c
                tf[k] = x * c / a + _MAGIC  # only used where a > 0, as in C
            for k in range(nl):
                new_l = max(-nmax, min(nmax - 1, (ti[k] & 0x7FFFFF) - 0x400000))
                x = X[b + k]
                w = x * x
                fn = F32(new_l)
                a = t1[k] + w * x * fn
                c = t2[k] + w * fn * fn
                ok = (
                    active[k] == 1
                    and t1[k] > 0
                    and new_l != L[b + k]
                    and c > 0
                    and a * a * sl2[k] > slx[k] * slx[k] * c
                )
                if ok:
                    L[b + k] = new_l
                    slx[k] = a
                    sl2[k] = c
                    changed[k] += 1
        any_active = False
        for k in range(nl):
            if active[k] == 1 and changed[k] == 0:
                active[k] = 0
            if active[k] == 1:
                any_active = True
        if not any_active:
            break
    for k in range(nl):
        live = amax[k] >= _EPS
        scl[k] = (slx[k] / sl2[k] if sl2[k] > 0 else _F0) if live else _F0
        for i in range(n):
            L[i * nl + k] = L[i * nl + k] + nmax if live else 0


@_jit()
def _pack_2bit(y, at, lb):  # type: ignore[no-untyped-def]
    """Byte 32h + l = lb[128h + l] | lb[128h+32+l] << 2 | lb[128h+64+l] << 4 | ... << 6."""
    for h in range(2):
        for i in range(32):
            o = 128 * h + i
            y[at + 32 * h + i] = (
                (lb[o] & 3)
                | ((lb[o + 32] & 3) << 2)
                | ((lb[o + 64] & 3) << 4)
                | ((lb[o + 96] & 3) << 6)
            )


@_jit()
def _lowk_rows(rows, qw, out, kind):  # type: ignore[no-untyped-def]
    """Q2_K (kind 2) / Q3_K (kind 3), the imatrix path when qw is non-empty."""
    r, n = rows.shape
    nb = n // 256
    total = r * nb
    weighted = qw.shape[0] > 0
    tsize = 84 if kind == 2 else 110
    xb = rows.reshape(total, 256)
    yb = out.reshape(total, tsize)
    nl_max = 16 * _G
    X = np.empty(16 * nl_max, np.float32)
    W = np.empty(16 * nl_max, np.float32)
    L = np.empty(16 * nl_max, np.int32)
    laux = np.empty(16 * nl_max, np.int32)
    scl = np.empty(nl_max, np.float32)
    tmin = np.empty(nl_max, np.float32)
    sw = np.empty(nl_max, np.float32)
    st = np.empty((16, nl_max), np.float32)
    X2 = np.empty(16 * _G, np.float32)
    L2 = np.empty(16 * _G, np.int32)
    scl2 = np.empty(_G, np.float32)
    ls = np.empty(16, np.int32)
    lm = np.empty(16, np.int32)
    lb = np.empty(256, np.int32)
    if weighted:
        rmin, rdelta, nstep = F32(-0.9), F32(0.05), 36
    else:
        rmin, rdelta, nstep = F32(-0.5), _F0_1, 15
    for g0 in range(0, total, _G):
        gn = min(_G, total - g0)
        nl = 16 * gn
        for g in range(gn):
            x = xb[g0 + g]
            if weighted:
                s2 = _F0
                for i in range(256):
                    s2 += x[i] * x[i]
                sigma2 = s2 / F32(256) if kind == 2 else F32(2) * s2 / F32(256)
                qo = 256 * ((g0 + g) % nb)
            for j in range(16):
                for i in range(16):
                    v = x[16 * j + i]
                    X[i * nl + 16 * g + j] = v
                    if weighted:
                        W[i * nl + 16 * g + j] = qw[qo + 16 * j + i] * np.sqrt(sigma2 + v * v)
                    else:
                        W[i * nl + 16 * g + j] = abs(v)
        if weighted:
            for k in range(nl):
                sw[k] = _F0
            for i in range(16):
                for k in range(nl):
                    sw[k] += W[i * nl + k]
        # One call site per search helper: each call site gets its own optimised copy.
        if kind == 2:
            _qkx_lanes(X, W, nl, 16, 3, rmin, rdelta, nstep, not weighted, not weighted,
                       L, scl, tmin, st, laux)  # fmt: skip
        elif not weighted:
            _q3_lanes(X, nl, 16, 4, L, scl, st)
        else:
            # pass 0: the 16 weights of each block; pass 1: the 16 block scales of each
            # super-block against their summed weights, both with make_qx_quants
            for p in range(2):
                if p == 1:
                    for g in range(gn):
                        for j in range(16):
                            X2[j * gn + g] = scl[16 * g + j]
                            W[j * gn + g] = sw[16 * g + j]
                _qx_lanes(X if p == 0 else X2, W, nl if p == 0 else gn, 16, 4 if p == 0 else 32,
                          L if p == 0 else L2, scl if p == 0 else scl2, st, laux)  # fmt: skip
        for g in range(gn):
            x = xb[g0 + g]
            y = yb[g0 + g]
            y[:] = 0
            for j in range(16):
                for i in range(16):
                    lb[16 * j + i] = L[i * nl + 16 * g + j]
            if kind == 2:
                sl = slice(16 * g, 16 * g + 16)
                _q2_k_finish(x, y, weighted, scl[sl], tmin[sl], sw[sl], ls, lm, lb)
            else:
                _q3_k_finish(x, y, weighted, scl[16 * g : 16 * g + 16], scl2[g],
                             L2, g, gn, ls, lb)  # fmt: skip


@_jit()
def _q2_k_finish(x, y, weighted, sc16, mn16, sw16, ls, lm, lb):  # type: ignore[no-untyped-def]
    """Scales, super-scales, requantization and packing of one Q2_K block."""
    if weighted:
        d = _qp(sc16, 16, 15, sw16, ls)
        dmin = _qp(mn16, 16, 15, sw16, lm)
        for j in range(16):
            y[j] = (ls[j] | (lm[j] << 4)) & 0xFF
    else:
        max_scale = _F0
        max_min = _F0
        for j in range(16):
            if sc16[j] > max_scale:
                max_scale = sc16[j]
            if mn16[j] > max_min:
                max_min = mn16[j]
        d = _F0
        dmin = _F0
        if max_scale > 0:
            iscale = F32(15) / max_scale
            for j in range(16):
                y[j] = _nearest_int(iscale * sc16[j]) & 0xFF
            d = max_scale / F32(15)
        if max_min > 0:
            iscale = F32(15) / max_min
            for j in range(16):
                y[j] |= (_nearest_int(iscale * mn16[j]) << 4) & 0xFF
            dmin = max_min / F32(15)
    dq = _put_f16(y, 80, d)
    mq = _put_f16(y, 82, dmin)
    for j in range(16):
        dd = dq * F32(y[j] & 0xF)
        if dd == 0:
            continue
        dm = mq * F32(y[j] >> 4)
        for i in range(16):
            lb[16 * j + i] = max(0, min(3, _nearest_int((x[16 * j + i] + dm) / dd)))
    _pack_2bit(y, 16, lb)


@_jit()
def _q3_k_finish(x, y, weighted, sc16, d_block, L2, g, gn, ls, lb):  # type: ignore[no-untyped-def]
    """Scales, super-scale, requantization and packing of one Q3_K block."""
    live = True
    if weighted:
        d = d_block
        for j in range(16):
            ls[j] = L2[j * gn + g]
    else:
        amax = _F0
        max_scale = _F0
        for j in range(16):
            if abs(sc16[j]) > amax:
                amax = abs(sc16[j])
                max_scale = sc16[j]
        live = max_scale != 0
        d = _F0
        if live:
            iscale = F32(-32) / max_scale
            for j in range(16):
                l8 = ((_nearest_int(iscale * sc16[j]) + 128) & 0xFF) - 128  # int8_t
                ls[j] = max(-32, min(31, l8)) + 32
            d = _F1 / iscale
    if live:
        for j in range(16):
            lj = ls[j]
            if j < 8:
                y[96 + j] = lj & 0xF
            else:
                y[96 + j - 8] |= (lj & 0xF) << 4
            y[96 + 8 + j % 4] |= ((lj >> 4) << (2 * (j // 4))) & 0xFF
    dq = _put_f16(y, 108, d)
    for j in range(16):
        if j < 8:
            sc = np.int64(y[96 + j]) & 0xF
        else:
            sc = np.int64(y[96 + j - 8]) >> 4
        sc = (sc | (((np.int64(y[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        dd = dq * F32(sc)
        if dd == 0:
            continue
        for i in range(16):
            lb[16 * j + i] = max(-4, min(3, _nearest_int(x[16 * j + i] / dd))) + 4
    for j in range(256):
        if lb[j] > 3:
            y[j % 32] |= 1 << (j // 32)
            lb[j] -= 4
    _pack_2bit(y, 32, lb)


# --- entry points -----------------------------------------------------------------------------
# Few entry points, each covering a family: numba re-optimises every callee inside each entry
# point it is linked into, so one entry per type would multiply the (one-off) compile time.


@_jit()
def legacy_rows(rows, qw, out, kind):  # type: ignore[no-untyped-def]
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 (kind 0..3): quantize_row_*_ref, or *_impl with the imatrix."""
    _legacy_rows(rows, qw, out, kind)


@_jit()
def kquant_rows(rows, qw, out, kind):  # type: ignore[no-untyped-def]
    """Q4_K / Q5_K / Q6_K (kind 4, 5, 6): quantize_row_*_ref, or *_impl with the imatrix."""
    if kind == 6:
        _q6_k_rows(rows, qw, out)
    else:
        _k4_rows(rows, qw, out, 15 if kind == 4 else 31)


@_jit()
def lowk_rows(rows, qw, out, kind):  # type: ignore[no-untyped-def]
    """Q2_K / Q3_K (kind 2, 3): quantize_row_*_ref, or *_impl with the imatrix."""
    _lowk_rows(rows, qw, out, kind)


def _bind(entry, kind: int):  # type: ignore[no-untyped-def]
    def kernel(rows: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
        entry(rows, qw, out, kind)

    return kernel


KERNELS = {
    "Q8_0": q8_0_rows,
    "Q4_0": _bind(legacy_rows, 0),
    "Q4_1": _bind(legacy_rows, 1),
    "Q5_0": _bind(legacy_rows, 2),
    "Q5_1": _bind(legacy_rows, 3),
    "Q2_K": _bind(lowk_rows, 2),
    "Q3_K": _bind(lowk_rows, 3),
    "Q4_K": _bind(kquant_rows, 4),
    "Q5_K": _bind(kquant_rows, 5),
    "Q6_K": _bind(kquant_rows, 6),
}
