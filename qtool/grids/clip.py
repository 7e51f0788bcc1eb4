"""Choosing the quantization range of each row: min/max, percentile, MSE or KL search.

All methods work on a ``[rows, n]`` float32 block (rows = tensors, channels or groups, see
:mod:`qtool.grids.affine`) and return the range ``(lo, hi)`` per row; the scheme turns it
into a scale and a zero point. The searches shrink the min/max range by factors
``1, 1 - 1/grid, ..., 1 - max_shrink`` (the grid of the GPTQ reference ``Quantizer.find_params``
with ``mse=True``) and keep, per row, the factor with the lowest error. The first candidate is
the unclipped range, so a search never does worse than ``none`` by its own measure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from qtool.grids.affine import QuantScheme, fake_quantize, params_from_range


def fit_range(
    w: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped range of each row of ``w`` under ``scheme.clip``. ``importance`` (``[n]`` or
    ``[rows, n]``, e.g. the mean ``x^2`` of each weight's input channel) weights the MSE
    search's squared errors, as llama.cpp's importance matrix weights its scale searches."""
    method = scheme.clip.method
    if method == "percentile" and scheme.clip.percentile < 100.0:
        return _percentile(w, scheme)
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    if method == "mse":
        if importance is not None:
            imp = importance.to(device=w.device, dtype=torch.float32)
            return _search(w, lo, hi, scheme, lambda a, b, _s: (imp * (a - b).pow(2)).sum(dim=1))
        return _search(w, lo, hi, scheme, _sq_error)
    if method == "kl":
        return _kl_search(w, lo, hi, scheme)
    return lo, hi


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=1)`` (linear interpolation) for rows of any length:
    ``torch.quantile`` refuses inputs above 2^24 elements, which a per-tensor scale of a 7B
    model's MLP weight exceeds. Two ``kthvalue`` calls give the same value."""
    n = x.shape[1]
    pos = q * (n - 1)
    k = int(pos)
    frac = pos - k
    a = torch.kthvalue(x, k + 1, dim=1).values
    if frac == 0.0 or k + 1 >= n:
        return a
    b = torch.kthvalue(x, k + 2, dim=1).values
    return a + (b - a) * frac


def _percentile(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    p = scheme.clip.percentile / 100.0
    if scheme.sym:
        amax = _quantile(w.abs(), p)
        return -amax, amax
    return _quantile(w, 1.0 - p), _quantile(w, p)


def _factors(scheme: QuantScheme) -> Iterator[float]:
    """The shrink factors of the searches: ``1 - i / grid`` for ``i < max_shrink * grid``."""
    grid, steps = scheme.clip.grid, int(scheme.clip.max_shrink * scheme.clip.grid)
    for i in range(max(1, steps)):
        yield 1.0 - i / grid


ErrorFn = Callable[[torch.Tensor, torch.Tensor, QuantScheme], torch.Tensor]


def _search(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, error: ErrorFn
) -> tuple[torch.Tensor, torch.Tensor]:
    best = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for f in _factors(scheme):
        clo, chi = lo * f, hi * f
        s, z = params_from_range(clo, chi, scheme)
        err = error(w, fake_quantize(w, s, z, scheme), scheme)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, clo, best_lo)
        best_hi = torch.where(better, chi, best_hi)
    return best_lo, best_hi


def _sq_error(w: torch.Tensor, wq: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return (w - wq).pow(2).sum(dim=1)


# KL search: histogram bins per row (TensorRT uses 2048 for activations; a row of a weight
# group has far fewer values, so the histogram gets about one bin per value, at least 64).
KL_MAX_BINS = 2048
KL_MIN_BINS = 64
KL_EPS = 1e-6  # smoothing of Q's empty bins (where P has mass); sets the cost of folded tails


def _kl_search(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the shrink factor minimising ``KL(P || Q)``: TensorRT's entropy calibration
    (Migacz 2017, "8-bit Inference with TensorRT", GTC; ``_get_optimal_threshold`` in MXNet /
    ONNX Runtime) adapted to weights and to this module's shrink grid.

    Definition, per row with ``B`` bins:

    - the histogram ``h`` of the values is taken over ``[0, max|w|]`` (symmetric schemes: of
      ``|w|``, since only the magnitude decides the code up to its sign) or over ``[min, max]``
      (asymmetric schemes: two-sided), once per row;
    - a candidate range ``f * range`` keeps the bins whose centre lies inside it. The reference
      distribution ``P`` is ``h`` on those bins with the mass outside folded into the edge bins
      (the clipped values land on the edge codes);
    - ``Q`` is the unfolded ``h`` on the same bins, quantized: bins whose centres fall on the
      same code of the scheme (the real scale, zero point and restricted range of
      :func:`~qtool.grids.affine.params_from_range`) form one level, and the level's mass is
      spread evenly over its non-empty bins (TensorRT's "expand back");
    - both are normalised, ``Q`` gets ``KL_EPS`` where it is empty and ``P`` is not (only the
      edge bins, when the folded tail lands on an empty bin), and
      ``KL(P || Q) = sum_i P_i log(P_i / Q_i)`` over the bins where ``P_i > 0``.

    Ties keep the wider range (the search starts at ``f = 1``); a row of zeros keeps its range.
    """
    rows, n = w.shape
    bins = max(KL_MIN_BINS, min(KL_MAX_BINS, n))
    if scheme.sym:
        x = w.abs()
        base_lo, base_hi = torch.zeros_like(lo), torch.maximum(-lo, hi)
    else:
        x = w
        base_lo = torch.minimum(lo, torch.zeros_like(lo))
        base_hi = torch.maximum(hi, torch.zeros_like(hi))
    width = (base_hi - base_lo) / bins
    live = width > 0
    safe = torch.where(live, width, torch.ones_like(width))
    idx = ((x - base_lo[:, None]) / safe[:, None]).floor().clamp(0, bins - 1).long()
    hist = torch.zeros(rows, bins, dtype=torch.float32).scatter_add_(1, idx, torch.ones_like(x))
    centers = base_lo[:, None] + (torch.arange(bins, dtype=torch.float32) + 0.5) * width[:, None]
    nonempty = hist > 0
    ncells = scheme.maxq + 2  # codes 0..maxq, plus one slot for bins outside the range

    best = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for f in _factors(scheme):
        clo, chi = base_lo * f, base_hi * f
        if scheme.sym:
            s, z = params_from_range(-chi, chi, scheme)
        else:
            s, z = params_from_range(clo, chi, scheme)
        inside = (centers >= clo[:, None]) & (centers <= chi[:, None])
        below = (centers < clo[:, None]) & ~inside
        above = (centers > chi[:, None]) & ~inside
        first = inside.float().argmax(dim=1, keepdim=True)
        last = bins - 1 - inside.flip(1).float().argmax(dim=1, keepdim=True)
        p = hist * inside
        p.scatter_add_(1, first, (hist * below).sum(dim=1, keepdim=True))
        p.scatter_add_(1, last, (hist * above).sum(dim=1, keepdim=True))
        codes = _codes(centers, s, z, scheme)
        cell = torch.where(inside, codes, torch.full_like(codes, ncells - 1))
        mass = torch.zeros(rows, ncells).scatter_add_(1, cell, hist * inside)
        count = torch.zeros(rows, ncells).scatter_add_(1, cell, (nonempty & inside).float())
        q = torch.where(
            nonempty & inside, mass.gather(1, cell) / count.gather(1, cell).clamp(min=1), 0.0
        )
        err = _kl(p, q)
        err = torch.where(live, err, torch.zeros_like(err))
        better = err < best
        best = torch.where(better, err, best)
        if scheme.sym:
            best_lo = torch.where(better, -chi, best_lo)
        else:
            best_lo = torch.where(better, clo, best_lo)
        best_hi = torch.where(better, chi, best_hi)
    return best_lo, best_hi


def _codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme
) -> torch.Tensor:
    """Integer codes (int64, for indexing) of ``x`` ``[rows, n]`` under per-row parameters."""
    lo = 1 if scheme.sym and scheme.restricted else 0
    q = torch.round(x / scale[:, None]) + zero[:, None].to(torch.float32)
    return q.clamp(lo, scheme.maxq).long()


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` per row of two unnormalised histograms, ``Q`` smoothed with ``KL_EPS``."""
    p = p / p.sum(dim=1, keepdim=True).clamp(min=1e-30)
    q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-30)
    q = torch.where((q == 0) & (p > 0), KL_EPS, q)
    terms = torch.where(p > 0, p * (p.clamp(min=1e-30) / q.clamp(min=1e-30)).log(), 0.0)
    return terms.sum(dim=1)
