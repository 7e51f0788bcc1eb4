"""Choosing the quantization range of each row: min/max, percentile, MSE or KL search.

All methods work on a ``[rows, n]`` float32 block (rows = tensors, channels or groups, see
:mod:`qtool.quantize.scheme`) and return the range ``(lo, hi)`` per row; the scheme turns it
into a scale and a zero point. The searches shrink the min/max range by factors
``1, 1 - 1/grid, ..., 1 - max_shrink`` (the grid of the GPTQ reference ``Quantizer.find_params``
with ``mse=True``) and keep, per row, the factor with the lowest error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qtool.quantize.scheme import QuantScheme, fake_quantize, params_from_range


def fit_range(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped range of each row of ``w`` under ``scheme.clip``."""
    method = scheme.clip.method
    if method == "percentile" and scheme.clip.percentile < 100.0:
        return _percentile(w, scheme)
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    if method == "mse":
        return _search(w, lo, hi, scheme, _sq_error)
    if method == "kl":
        return _search(w, lo, hi, scheme, _kl_error)
    return lo, hi


def _percentile(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    p = scheme.clip.percentile / 100.0
    if scheme.sym:
        amax = torch.quantile(w.abs(), p, dim=1) if w.shape[1] > 1 else w.abs()[:, 0]
        return -amax, amax
    if w.shape[1] == 1:
        return w[:, 0], w[:, 0]
    q = torch.quantile(w, torch.tensor([1.0 - p, p], dtype=w.dtype), dim=1)
    return q[0], q[1]


ErrorFn = Callable[[torch.Tensor, torch.Tensor, QuantScheme], torch.Tensor]


def _search(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, error: ErrorFn
) -> tuple[torch.Tensor, torch.Tensor]:
    grid, steps = scheme.clip.grid, int(scheme.clip.max_shrink * scheme.clip.grid)
    best = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(steps):
        f = 1.0 - i / grid
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


def _kl_error(w: torch.Tensor, wq: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    raise NotImplementedError("KL clipping lands with the clipping tests")
