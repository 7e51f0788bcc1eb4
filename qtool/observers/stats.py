"""Streaming activation statistics, fed by forward hooks on linear layers.

For every linear layer's **input** (per input channel ``j``, over all calibration tokens ``t``):

- ``sum_sq[j] = Σ_t x[t, j]²`` and ``count`` (tokens): the importance matrix. ``sum_sq / count``
  is what llama.cpp's ``llama-quantize --imatrix`` weighs each column by (tools/imatrix/
  imatrix.cpp, ``collect_imatrix``: ``acc[j] += x[j] * x[j]``, ``counts += rows``);
- ``absmax[j]``, ``min[j]``, ``max[j]``: for per-channel outlier detection (LLM.int8(),
  SmoothQuant's ``max|X_j|``) and static (min/max) activation quantization;
- a histogram of ``|x|`` over the whole tensor, for percentile and KL (entropy) clipping
  (Migacz, "8-bit Inference with TensorRT", GTC 2017). It has a fixed number of bins over
  ``[0, R]`` with ``R`` a power of two: when a larger value arrives, ``R`` doubles and pairs
  of bins merge, which is exact (no re-binning error);
- optionally the GPTQ Hessian ``Σ_t x xᵀ`` (Frantar et al. 2022; ``H = 2 X Xᵀ``), kept once per
  distinct input (q/k/v share theirs).

For the **output**: per-channel ``absmax`` and tensor ``min``/``max`` (static output ranges, e.g.
the KV-cache scales from ``k_proj``/``v_proj``).

Sums are accumulated in float64, the rest in float32, on the layer's device; only the current
layer's accumulators live there (they move to the CPU when its layer is done). Sums restart at
every group of consecutive batches (:func:`qtool.runner.dist.groups`) and each group's sum is
added *exactly* into a float64 pair (:func:`fold`): the totals are then independent of how the
groups were spread over processes (``torchrun``), so one process and several give the same
bits. Counts and histograms are integers, extremes are exact, and :meth:`StatsCollector.reduce`
combines the ranks' in a fixed order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qtool.errors import QToolError

HIST_BINS = 2048
_MIN_RANGE = 2.0**-24
_BLOCK = 1 << 22  # elements per row block (16 MiB of float32)


class NonFiniteError(QToolError):
    """An activation was inf or nan (overflow in a low-precision forward, or broken weights)."""


@contextlib.contextmanager
def _exact_bf16_products(
    src: torch.dtype, acc_dtype: torch.dtype, device: torch.device
) -> Iterator[None]:
    """float32 matrix products on the CPU through oneDNN's bf16 kernels when the values came
    from a bfloat16 forward (``src``): a bf16 value times a bf16 value is
    exact in float32 and the kernels accumulate in float32, so ``x^T x`` is what the float32
    kernel computes, up to the order of the additions, about 1.6x faster on a CPU with AMX
    (without AMX, oneDNN keeps its float32 kernel: nothing changes). Any other input keeps
    full float32 products (a float32 value is not exact in bf16)."""
    mm: Any = getattr(torch.backends.mkldnn, "matmul", None)  # torch >= 2.9 (not in stubs)
    use = (
        src == torch.bfloat16
        and acc_dtype == torch.float32
        and device.type == "cpu"
        and mm is not None
        and torch.backends.mkldnn.is_available()
    )
    if not use:
        yield
        return
    before = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = before


def fold(hi: torch.Tensor, lo: torch.Tensor, p: torch.Tensor) -> None:
    """``hi + lo += p`` exactly (float64 ``hi``, ``lo``): Knuth's TwoSum splits ``hi + p``
    into its rounded sum and the exact rounding error, which goes into ``lo``. The pair then
    holds the exact sum of everything folded in as long as ``lo``'s own additions are exact:
    the ``n`` values added to one entry must lie within about ``2^(53 - 2 log2 n)`` of each
    other in magnitude (float64 partials; ``2^(82 - 2 log2 n)`` for float32 ones, GPTQ's),
    with ``n`` at most :data:`qtool.runner.dist.GROUPS` plus the ranks. Exact sums do not
    depend on the order of the additions. On the CPU a compiled loop does the same operations
    entry by entry (:func:`qtool.kernels.columns.fold`): one pass, no temporaries."""
    from qtool.kernels import columns

    if not hi.shape == lo.shape == p.shape:  # the compiled loop reads what the shapes say
        raise ValueError(f"fold: shapes {tuple(hi.shape)}, {tuple(lo.shape)}, {tuple(p.shape)}")
    if columns.AVAILABLE and hi.device.type == "cpu" and p.device.type == "cpu" and hi.dim() <= 2:
        v = [t.reshape(1, -1) if t.dim() < 2 else t for t in (hi, lo, p)]  # views
        columns.fold(*(t.numpy() for t in v))
        return
    p = p.to(torch.float64, copy=True)  # a scratch copy: the steps below work in place
    s = hi + p
    b = s - hi  # the part of p that made it into s
    p.sub_(b)  # p - b: what of p was lost
    torch.sub(s, b, out=b)
    torch.sub(hi, b, out=b)  # hi - (s - b): what of hi was lost
    lo.add_(b.add_(p))
    hi.copy_(s)


def merge(hi: torch.Tensor, lo: torch.Tensor, hi2: torch.Tensor, lo2: torch.Tensor) -> None:
    """Add the pair ``hi2 + lo2`` into ``hi + lo`` (exactly, under :func:`fold`'s bound)."""
    fold(hi, lo, hi2)
    lo.add_(lo2)


class HessianAccumulator:
    """``sum x x^T`` over every input row a layer sees, added batch by batch (the GPTQ
    reference's ``add_batch``); :meth:`hessian` returns ``2/n sum x x^T``. The one accumulator
    of input second moments: GPTQ's Hessians and ``qtool calibrate --hessian`` both use it.

    The matrix is symmetric, so only its upper blocks are computed (at most 4 column blocks of at
    least ``BLOCK`` columns): with 4 blocks that is 10 of 16 block products, 37.5% fewer FLOPs
    on what is, with the forward itself, the cost of a GPTQ layer, and the float64 pair below
    stores those blocks alone (at 14336 columns, 8B's down_proj, 2.1 GB instead of 3.3).
    ``dtype``: float32 (GPTQ's, as the reference code) or float64.

    Batches are summed in ``dtype`` within a group of consecutive batches
    (:func:`qtool.runner.dist.groups`); :meth:`end_group` adds the group's sum *exactly* into a
    float64 pair (:func:`fold`), so the total does not depend on how the
    groups were spread over processes (:meth:`reduce`): one process or several, the same bits."""

    BLOCK = 256
    BUFFER_ROWS = 2048

    def __init__(
        self,
        columns: int,
        device: torch.device,
        *,
        absmax: bool = False,
        dtype: torch.dtype = torch.float32,
        buffer_rows: int | None = None,
    ) -> None:
        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=dtype, device=device)  # this group's
        self.hi: torch.Tensor | None = None  # the exact total so far: hi + lo (float64)
        self.lo: torch.Tensor | None = None
        self._pending = False
        # per-channel max |x|, for static activation scales (off unless asked: it costs a pass)
        self.absmax = torch.zeros(columns, dtype=torch.float32, device=device) if absmax else None
        self.rows = 0
        n = self.column_blocks(columns)
        edges = [round(i * columns / n) for i in range(n + 1)]
        self.blocks = list(zip(edges[:-1], edges[1:], strict=True))
        # the upper blocks (i <= j), in order, and where each starts in the pair's storage
        self.upper: list[tuple[int, int, int, int, int]] = []
        start = 0
        for a, (i0, i1) in enumerate(self.blocks):
            for j0, j1 in self.blocks[a:]:
                self.upper.append((i0, i1, j0, j1, start))
                start += (i1 - i0) * (j1 - j0)
        self.pair_entries = start  # 10 of 16 blocks' entries with 4 blocks
        # input rows waiting for one product (in ``dtype``, converted as they are copied in): a
        # batch of 512 tokens makes a thin product whose cost is mostly reading and writing
        # the float32 sum, so rows are gathered up to ``buffer_rows`` (or the end of a batch
        # group, or a change of input dtype) first. float64 sums (``qtool calibrate --hessian``)
        # keep none: their products cost their flops, and the buffer would be 8 bytes an entry
        if buffer_rows is None:
            buffer_rows = self.BUFFER_ROWS if dtype == torch.float32 else 0
        self.buffer_rows = buffer_rows
        self._buf: torch.Tensor | None = None
        self._fill = 0
        self._src = dtype  # the dtype the buffered rows came in

    @classmethod
    def column_blocks(cls, columns: int) -> int:
        """How many column blocks a ``columns``-wide accumulator has: at most 4, of at least
        ``BLOCK`` columns (the memory plan counts its storage by the same rule)."""
        return max(1, min(4, columns // cls.BLOCK))

    def _block(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        """Upper block ``k`` of the float64 pair's flat storage, as a matrix."""
        i0, i1, j0, j1, start = self.upper[k]
        return flat[start : start + (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)

    def add(self, x: torch.Tensor) -> None:
        raw = x.detach().reshape(-1, x.shape[-1])
        n = raw.shape[0]
        if self.absmax is not None:
            self.absmax = torch.maximum(self.absmax, raw.abs().amax(dim=0).float())
        self.rows += n
        self._pending = True
        if self._fill and (raw.dtype != self._src or self._fill + n > self.buffer_rows):
            self._flush()
        if n >= self.buffer_rows:  # as wide a product as the buffer's: no copy
            self._product(raw.to(self.sum.dtype), raw.dtype)
            return
        if self._buf is None:
            self._buf = torch.empty(
                self.buffer_rows, self.columns, dtype=self.sum.dtype, device=self.sum.device
            )
        self._buf[self._fill : self._fill + n].copy_(raw)  # converted as it is copied
        self._src = raw.dtype
        self._fill += n

    def _flush(self) -> None:
        if self._buf is not None and self._fill:
            self._product(self._buf[: self._fill], self._src)
        self._fill = 0

    def _product(self, x: torch.Tensor, src: torch.dtype) -> None:
        """``sum += x^T x`` (the upper blocks) for rows ``x`` in ``dtype`` that came as ``src``."""
        with _exact_bf16_products(src, self.sum.dtype, x.device):
            for a, (i0, i1) in enumerate(self.blocks):
                xi = x[:, i0:i1]
                for j0, j1 in self.blocks[a:]:
                    self.sum[i0:i1, j0:j1].addmm_(xi.T, x[:, j0:j1])

    def end_group(self) -> None:
        """Add this group's sum exactly into the total (upper blocks only) and restart it."""
        if self.hi is None or self.lo is None:  # the upper blocks only, one after another
            self.hi = torch.zeros(self.pair_entries, dtype=torch.float64, device=self.sum.device)
            self.lo = torch.zeros_like(self.hi)
        if not self._pending:
            return
        self._flush()
        for k, (i0, i1, j0, j1, _) in enumerate(self.upper):
            fold(self._block(self.hi, k), self._block(self.lo, k), self.sum[i0:i1, j0:j1])
        self.sum.zero_()
        self._pending = False

    def reduce(self, world: Any) -> None:
        """Sum over the ranks of ``world`` (:class:`qtool.runner.dist.World`): exact, every rank
        ends with the same bits."""
        self.end_group()
        assert self.hi is not None and self.lo is not None
        world.exact_sum_(self.hi, self.lo)
        self.rows = world.sum_int(self.rows)
        if self.absmax is not None:
            world.all_reduce_(self.absmax, "max")

    def xtx(self, *, release: bool = False) -> torch.Tensor:
        """``sum x x^T`` (both triangles), in ``dtype``: the exact sum, rounded once.
        ``release``: written over the (spent) batch-group sum and the sums freed (:meth:`release`)
        instead of a new matrix beside them; the accumulator is done."""
        self.end_group()
        hi, lo = self.hi, self.lo
        assert hi is not None and lo is not None
        # block by block: a float64 temporary of one block, not three of the whole matrix
        # (at 14336 columns, 8B's down_proj, those were 1.6 GB each); every entry is written
        out = (
            self.sum
            if release
            else torch.empty(self.sum.shape, dtype=self.sum.dtype, device=self.sum.device)
        )
        for k, (i0, i1, j0, j1, _) in enumerate(self.upper):
            out[i0:i1, j0:j1] = self._block(hi, k) + self._block(lo, k)  # rounded once
            if j0 != i0:
                out[j0:j1, i0:i1] = out[i0:i1, j0:j1].T
        for i0, i1 in self.blocks:
            d = out[i0:i1, i0:i1]
            d.copy_(torch.triu(d) + torch.triu(d, diagonal=1).T)
        if release:
            self.release()
        return out

    def hessian(self, *, release: bool = False) -> torch.Tensor:
        """``2/n sum x x^T``; ``release``: as :meth:`xtx`'s (GPTQ's runner: the Hessian in the
        memory of the float32 sum, the float64 pair freed)."""
        if self.rows == 0:
            raise QToolError("GPTQ: a layer received no calibration input")
        return self.xtx(release=release).mul_(2.0 / self.rows)

    def release(self) -> None:
        """Free the sums (``rows`` and ``absmax`` stay): once the Hessian has been read out,
        they are 20 bytes an entry the GPTQ solve that follows does not need."""
        empty = torch.empty(0, 0, dtype=self.sum.dtype, device=self.sum.device)
        self.sum, self.hi, self.lo = empty, None, None
        self._buf, self._fill = None, 0
        self._pending = False


class InputAccumulator:
    """Running statistics of one linear layer's input channels."""

    def __init__(
        self, in_features: int, device: torch.device, *, bins: int = HIST_BINS, hessian: bool
    ) -> None:
        self.in_features = in_features
        self.count = 0
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)  # this group's
        self.sq_hi = torch.zeros_like(self.sum_sq)  # the exact total: sq_hi + sq_lo
        self.sq_lo = torch.zeros_like(self.sum_sq)
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.min = torch.full((in_features,), math.inf, dtype=torch.float32, device=device)
        self.max = torch.full((in_features,), -math.inf, dtype=torch.float32, device=device)
        self.hist = torch.zeros(bins, dtype=torch.int64, device=device)
        self.hist_range = 0.0
        self.top = 0  # values equal to hist_range: the last bin's, until the range doubles
        self.hessian = (
            HessianAccumulator(in_features, device, dtype=torch.float64) if hessian else None
        )

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (``[..., in_features]``)."""
        x = x.detach().reshape(-1, x.shape[-1])
        self.count += x.shape[0]
        lo, hi = x.amin(0).float(), x.amax(0).float()
        self.min = torch.minimum(self.min, lo)
        self.max = torch.maximum(self.max, hi)
        self.absmax = torch.maximum(self.max, -self.min)
        peak = float(torch.maximum(hi.max(), -lo.min())) if x.numel() else 0.0
        if not math.isfinite(peak):
            raise NonFiniteError("non-finite activations (inf/nan)")
        self._grow_hist(peak)
        # Row blocks bound the float32 temporaries; partial sums are added in float64.
        for rows in x.split(max(1, _BLOCK // max(1, x.shape[1]))):
            r = rows.float()
            self.sum_sq += r.square().sum(0).double()
            if self.hessian is not None:
                self.hessian.add(r)
            self._hist_add(r.abs().flatten())

    def _grow_hist(self, peak: float) -> None:
        if self.hist_range == 0.0:
            self.hist_range = (
                max(_MIN_RANGE, 2.0 ** math.ceil(math.log2(peak))) if peak > 0 else _MIN_RANGE
            )
        while peak > self.hist_range:
            self._double_hist()

    def _double_hist(self) -> None:
        """Double the range: bin pairs merge exactly, and the values equal to the old range
        (counted apart) fall in the first bin of the new upper half. The histogram is then the
        one made at the new range directly, whatever order the values came in."""
        bins = self.hist.numel()
        merged = self.hist.view(bins // 2, 2).sum(1)
        self.hist = torch.cat([merged, torch.zeros_like(merged)])
        self.hist[bins // 2] += self.top
        self.top = 0
        self.hist_range *= 2.0

    def _hist_add(self, a: torch.Tensor) -> None:
        # Exact integer counts (torch.histc counts in float32). |x| <= hist_range, so the index
        # is at most `bins`: the values equal to the range join the last bin in the result.
        bins = self.hist.numel()
        idx = a.mul_(bins / self.hist_range).to(torch.int32)
        if idx.is_cuda:
            counts = torch.bincount(idx, minlength=bins + 1)
        else:  # numpy's bincount is several times faster than torch's on the CPU
            counts = torch.from_numpy(np.bincount(idx.numpy(), minlength=bins + 1))
        counts = counts.to(torch.int64)
        self.top += int(counts[bins])
        self.hist += counts[:bins]

    def end_group(self) -> None:
        """The group of batches is done: add its sums exactly into the totals."""
        fold(self.sq_hi, self.sq_lo, self.sum_sq)
        self.sum_sq.zero_()
        if self.hessian is not None:
            self.hessian.end_group()

    def reduce(self, world: Any) -> None:
        """Combine the ranks' statistics (:class:`qtool.runner.dist.World`): sums exact,
        counts and histograms integers, extremes exact; every rank gets the same values."""
        self.end_group()
        self.count = world.sum_int(self.count)
        world.all_reduce_(self.min, "min")
        world.all_reduce_(self.max, "max")
        if self.count:
            self.absmax = torch.maximum(self.max, -self.min)
        rng = torch.tensor([self.hist_range], dtype=torch.float64)
        world.all_reduce_(rng, "max")
        if self.hist_range == 0.0:
            self.hist_range = float(rng[0])
        while self.hist_range < float(rng[0]):
            self._double_hist()
        world.all_reduce_(self.hist, "sum")
        self.top = world.sum_int(self.top)
        world.exact_sum_(self.sq_hi, self.sq_lo)
        if self.hessian is not None:
            self.hessian.reduce(world)

    def result(self, name: str) -> LinearStats:
        """The finished statistics, on the CPU."""
        return LinearStats(
            name=name,
            in_features=self.in_features,
            count=self.count,
            sum_sq=self._sum_sq().cpu().numpy(),
            absmax=self.absmax.cpu().numpy(),
            min=self.min.cpu().numpy(),
            max=self.max.cpu().numpy(),
            hist=self._hist().cpu().numpy(),
            hist_range=self.hist_range,
            hessian=None if self.hessian is None else self.hessian.xtx().float().cpu().numpy(),
        )

    def _sum_sq(self) -> torch.Tensor:
        self.end_group()
        return self.sq_hi + self.sq_lo

    def _hist(self) -> torch.Tensor:
        h = self.hist.clone()
        h[-1] += self.top
        return h


class OutputAccumulator:
    """Running per-channel absmax and tensor min/max of one linear layer's output."""

    def __init__(self, out_features: int, device: torch.device) -> None:
        self.absmax = torch.zeros(out_features, dtype=torch.float32, device=device)
        self.min = math.inf
        self.max = -math.inf

    @torch.no_grad()
    def update(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).float()
        lo, hi = y.amin(0), y.amax(0)
        self.absmax = torch.maximum(self.absmax, torch.maximum(hi, -lo))
        self.min = min(self.min, float(lo.min()))
        self.max = max(self.max, float(hi.max()))

    def reduce(self, world: Any) -> None:
        world.all_reduce_(self.absmax, "max")
        t = torch.tensor([-self.min, self.max], dtype=torch.float64)
        world.all_reduce_(t, "max")
        self.min, self.max = -float(t[0]), float(t[1])


@dataclass
class LinearStats:
    """Finished statistics of one linear layer (HF module name, e.g.
    ``model.layers.0.self_attn.q_proj``). Arrays are numpy, on the CPU."""

    name: str
    in_features: int
    count: int
    sum_sq: np.ndarray  # [in] float64
    absmax: np.ndarray  # [in] float32
    min: np.ndarray  # [in] float32
    max: np.ndarray  # [in] float32
    hist: np.ndarray  # [bins] int64, |x| over [0, hist_range]
    hist_range: float
    out_absmax: np.ndarray | None = None  # [out] float32
    out_min: float | None = None
    out_max: float | None = None
    hessian: np.ndarray | None = None  # [in, in] float32, Σ x xᵀ (shared inputs: once)
    shares_input_with: str | None = None  # the layer whose identical input was measured

    def to_state(self) -> dict[str, torch.Tensor]:
        """Every field as tensors, exactly (a resume folder's per-layer file)."""
        t: dict[str, torch.Tensor] = {
            "in_features": torch.tensor([self.in_features], dtype=torch.int64),
            "count": torch.tensor([self.count], dtype=torch.int64),
            "sum_sq": torch.from_numpy(np.array(self.sum_sq, copy=True)),
            "absmax": torch.from_numpy(np.array(self.absmax, copy=True)),
            "min": torch.from_numpy(np.array(self.min, copy=True)),
            "max": torch.from_numpy(np.array(self.max, copy=True)),
            "hist": torch.from_numpy(np.array(self.hist, copy=True)),
            "hist_range": torch.tensor([self.hist_range], dtype=torch.float64),
        }
        if self.out_absmax is not None:
            t["out_absmax"] = torch.from_numpy(np.array(self.out_absmax, copy=True))
            t["out_range"] = torch.tensor([self.out_min, self.out_max], dtype=torch.float64)
        if self.hessian is not None:
            t["hessian"] = torch.from_numpy(np.array(self.hessian, copy=True))
        return t

    @classmethod
    def from_state(
        cls, name: str, t: dict[str, torch.Tensor], shares_input_with: str | None
    ) -> LinearStats:
        out = t.get("out_range")
        return cls(
            name=name,
            in_features=int(t["in_features"][0]),
            count=int(t["count"][0]),
            sum_sq=t["sum_sq"].numpy(),
            absmax=t["absmax"].numpy(),
            min=t["min"].numpy(),
            max=t["max"].numpy(),
            hist=t["hist"].numpy(),
            hist_range=float(t["hist_range"][0]),
            out_absmax=t["out_absmax"].numpy() if "out_absmax" in t else None,
            out_min=float(out[0]) if out is not None else None,
            out_max=float(out[1]) if out is not None else None,
            hessian=t["hessian"].numpy() if "hessian" in t else None,
            shares_input_with=shares_input_with,
        )

    @property
    def importance(self) -> np.ndarray:
        """Mean squared activation per input channel: llama-quantize's per-column weight."""
        return self.sum_sq / max(1, self.count)

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0-100) of ``|x|`` over the tensor, from the histogram."""
        return percentile_from_hist(self.hist, self.hist_range, p)

    def kl_threshold(self, levels: int = 128) -> float:
        """The clipping threshold on ``|x|`` minimizing KL divergence to ``levels`` levels."""
        return kl_threshold_from_hist(self.hist, self.hist_range, levels=levels)


def percentile_from_hist(hist: np.ndarray, hist_range: float, p: float) -> float:
    """Upper edge of the bin where the cumulative count reaches ``p`` percent, linearly
    interpolated inside the bin."""
    total = float(hist.sum())
    if total == 0:
        return 0.0
    width = hist_range / hist.size
    target = total * min(max(p, 0.0), 100.0) / 100.0
    cdf = np.cumsum(hist, dtype=np.float64)
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, hist.size - 1)
    below = cdf[i - 1] if i > 0 else 0.0
    frac = (target - below) / hist[i] if hist[i] > 0 else 1.0
    return float((i + min(max(frac, 0.0), 1.0)) * width)


def kl_threshold_from_hist(
    hist: np.ndarray, hist_range: float, *, levels: int = 128, stride: int = 1
) -> float:
    """TensorRT's entropy calibration (Migacz 2017): for each candidate threshold bin ``i``
    the reference ``P`` is ``hist[:i]`` with the clipped tail folded into its last bin; ``Q``
    quantizes ``hist[:i]`` to ``levels`` bins and spreads each back evenly over its non-empty
    source bins; the threshold minimizes ``KL(P || Q)``."""
    h = hist.astype(np.float64)
    n = h.size
    width = hist_range / n
    if h.sum() == 0:
        return 0.0
    nz = np.nonzero(h)[0]
    last = int(nz[-1]) + 1
    if last <= levels:
        return float(last * width)
    best_kl, best_i = math.inf, n
    for i in range(levels, last + 1, max(1, stride)):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        src = h[:i]
        q = np.zeros(i)
        edges = np.linspace(0, i, levels + 1).round().astype(int)
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            if b <= a:
                continue
            chunk = src[a:b]
            used = chunk > 0
            k = int(used.sum())
            if k:
                q[a:b][used] = chunk.sum() / k
        mask = p > 0
        if np.any(q[mask] == 0):
            continue
        pn, qn = p / p.sum(), q / q.sum()
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float((best_i + 0.5) * width)


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


@dataclass
class StatsCollector:
    """Hooks on the linear layers of one module (a decoder layer, or the whole model), feeding
    :class:`InputAccumulator`/:class:`OutputAccumulator`. Inputs that are the same tensor
    object within one forward (q/k/v, gate/up) are measured once and shared.

    Use: ``attach(module, prefix)``, run forwards calling ``end_batch()`` after each, then
    ``detach()`` which returns the finished :class:`LinearStats` and frees the accumulators.
    """

    device: torch.device
    hessian: bool = False
    bins: int = HIST_BINS
    outputs: bool = True
    _inputs: dict[str, InputAccumulator] = field(default_factory=dict)
    _outputs: dict[str, OutputAccumulator] = field(default_factory=dict)
    _shared: dict[str, str] = field(default_factory=dict)
    _seen: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def attach(
        self, module: nn.Module, prefix: str, include: Callable[[str], bool] | None = None
    ) -> list[str]:
        """Hook every ``nn.Linear`` under ``module``; names are ``prefix + submodule name``."""
        names = []
        for sub_name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear):
                continue
            name = f"{prefix}{sub_name}" if sub_name else prefix.rstrip(".")
            if include is not None and not include(name):
                continue
            names.append(name)
            self._handles.append(sub.register_forward_pre_hook(self._pre_hook(name, sub)))
            if self.outputs:
                self._handles.append(sub.register_forward_hook(self._post_hook(name, sub)))
        return names

    def _pre_hook(self, name: str, mod: nn.Linear) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            self.observe_input(name, args[0], mod.in_features)

        return hook

    def _post_hook(self, name: str, mod: nn.Linear) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            self.observe_output(name, out, mod.out_features)

        return hook

    def observe_input(self, name: str, x: torch.Tensor, in_features: int) -> None:
        """Record one input of layer ``name`` (also usable without hooks, e.g. the lm_head)."""
        seen = self._seen.get(id(x))
        if seen is not None and seen[0] is x and seen[1] != name:
            owner = seen[1]
            if name not in self._inputs:
                self._inputs[name] = self._inputs[owner]
                self._shared[name] = owner
            if self._inputs[name] is self._inputs[owner]:
                return
        acc = self._inputs.get(name)
        if acc is None:
            acc = self._inputs[name] = InputAccumulator(
                in_features, self.device, bins=self.bins, hessian=self.hessian
            )
        acc.update(x)
        # Holding x keeps its id unique until end_batch(): no false sharing via a reused id.
        self._seen[id(x)] = (x, name)

    def observe_output(self, name: str, y: torch.Tensor, out_features: int) -> None:
        acc = self._outputs.get(name)
        if acc is None:
            acc = self._outputs[name] = OutputAccumulator(out_features, self.device)
        acc.update(y)

    def end_batch(self, group_end: bool = False) -> None:
        """Forget the inputs of the last forward (call after each forward); ``group_end``: the
        batch closes a group (:func:`qtool.runner.dist.groups`), whose sums are added exactly
        into the totals."""
        self._seen.clear()
        if group_end:
            for acc in self._distinct():
                acc.end_group()

    def _distinct(self) -> list[InputAccumulator]:
        """Each input accumulator once (shared inputs: the owner's), in name order."""
        return [acc for name, acc in sorted(self._inputs.items()) if name not in self._shared]

    def reduce(self, world: Any) -> None:
        """Combine the ranks' statistics (:class:`qtool.runner.dist.World`), in a fixed order.
        A rank that saw no input of some linear (an MoE expert no token of its samples reached)
        first gets empty accumulators for it, shaped as the other ranks' are."""
        if not world.active:
            return
        mine = {
            "in": {n: [a.in_features, self._shared.get(n)] for n, a in self._inputs.items()},
            "out": {n: int(a.absmax.numel()) for n, a in self._outputs.items()},
        }
        union: dict[str, list[Any]] = {}
        outs: dict[str, int] = {}
        for raw in world.all_gather_bytes(json.dumps(mine, sort_keys=True).encode()):
            theirs = json.loads(raw)
            for n, v in theirs["in"].items():
                if union.setdefault(n, v) != v:
                    raise QToolError(f"{n}: the ranks saw its input shared differently")
            outs.update(theirs["out"])
        for n, (features, owner) in sorted(union.items(), key=lambda kv: kv[1][1] is not None):
            if n in self._inputs:
                continue
            if owner is not None:
                if owner not in self._inputs:
                    self._inputs[owner] = InputAccumulator(
                        union[owner][0], self.device, bins=self.bins, hessian=self.hessian
                    )
                self._inputs[n] = self._inputs[owner]
                self._shared[n] = owner
            else:
                self._inputs[n] = InputAccumulator(
                    features, self.device, bins=self.bins, hessian=self.hessian
                )
        for n, features in outs.items():
            if n not in self._outputs:
                self._outputs[n] = OutputAccumulator(features, self.device)
        for acc in self._distinct():
            acc.reduce(world)
        for _, o in sorted(self._outputs.items()):
            o.reduce(world)

    def detach(self) -> dict[str, LinearStats]:
        """Remove the hooks and return the finished statistics (accumulators are freed)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        done: dict[int, LinearStats] = {}
        out: dict[str, LinearStats] = {}
        for name, acc in self._inputs.items():
            first = done.get(id(acc))
            st = acc.result(name)
            if first is not None:
                st.hessian = None  # kept once, on the layer that owns the shared input
                st.shares_input_with = first.name
            else:
                done[id(acc)] = st
            o = self._outputs.get(name)
            if o is not None:
                st.out_absmax = o.absmax.cpu().numpy()
                st.out_min, st.out_max = o.min, o.max
            out[name] = st
        self._inputs.clear()
        self._outputs.clear()
        self._shared.clear()
        return out


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------


def outlier_rows(
    stats: Iterable[LinearStats], *, factor: float = 20.0, top: int = 10
) -> list[dict[str, Any]]:
    """The most outlier-heavy inputs: channels whose absmax is over ``factor`` times the
    median channel absmax. One row per distinct input (q/k/v together), worst first, ranked by
    ``max / median`` absmax."""
    groups: dict[str, list[LinearStats]] = {}
    for st in stats:
        groups.setdefault(st.shares_input_with or st.name, []).append(st)
    rows: list[dict[str, Any]] = []
    for owner, members in groups.items():
        st = next((m for m in members if m.name == owner), members[0])
        med = float(np.median(st.absmax))
        peak = float(st.absmax.max()) if st.absmax.size else 0.0
        ratio = peak / med if med > 0 else math.inf if peak > 0 else 0.0
        outliers = int((st.absmax > factor * med).sum()) if med > 0 else 0
        rows.append(
            {
                "layer": _group_label([m.name for m in members]),
                "layers": [m.name for m in members],
                "in_features": st.in_features,
                "max_absmax": peak,
                "median_absmax": med,
                "ratio": ratio,
                "outlier_channels": outliers,
                "top_channel": int(st.absmax.argmax()) if st.absmax.size else None,
                "p99_9": st.percentile(99.9),
            }
        )
    rows.sort(key=lambda r: (-float(r["ratio"]), str(r["layer"])))
    return rows[:top]


def _group_label(names: list[str]) -> str:
    """``model.layers.3.self_attn.{q,k,v}_proj`` -> ``layers.3.self_attn.{q,k,v}_proj``."""
    short = [n.removeprefix("model.") for n in names]
    if len(short) == 1:
        return short[0]
    heads = {n.rsplit(".", 1)[0] for n in short}
    if len(heads) != 1:
        return ", ".join(short)
    leaves = [n.rsplit(".", 1)[1] for n in short]
    tail = os.path.commonprefix([x[::-1] for x in leaves])[::-1]
    if tail and all(len(x) > len(tail) for x in leaves):
        leaves = [x[: len(x) - len(tail)] for x in leaves]
    else:
        tail = ""
    return f"{heads.pop()}.{{{','.join(leaves)}}}{tail}"
