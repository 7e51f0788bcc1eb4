"""GPTQ for one weight matrix on any grid (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1), with the options of the
reference code (IST-DASLab/gptq ``GPTQ.fasterquant``) and AutoGPTQ: dampening, lazy block
updates, per-block parameters, act-order (``desc_act``) with or without static groups.

The weight is quantized column by column; the rounding error of each column is spread over the
columns not yet quantized through the inverse Hessian ``H^-1`` of the layer-wise objective
``||WX - QX||^2`` (``H = 2 X X^T``), whose upper Cholesky factor gives every update row.

The grid (:mod:`qtool.grids`) is a parameter, as the reference's injected ``quantizer``: each
block of columns (a group, a GGUF block, a row, the tensor) is fitted by the grid's own fit when
GPTQ reaches it (on the columns as the error feedback has updated them), or up front with static
groups; GPTQ then picks every code on that block's grid. The fit is weighted by each input
channel's mean ``x^2`` (``diag(H) / 2``), the importance llama.cpp's ``--imatrix`` gives its
block searches; the integer grid uses it only in its ``mse`` clipping search.

On the CPU the column loop of a lazy batch is compiled (:mod:`qtool.kernels.columns`) for every
grid whose fits are affine (:meth:`qtool.grids.base.Fit.affine`): a tensor loop spends some 25
small dispatches per column, most of a solve's time at small widths. The weight is held
transposed (a column per contiguous row) so that each rank-1 update runs across the rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from qtool.errors import BadInputError, QToolError
from qtool.grids.base import Fit, Grid, QuantizedTensor


@dataclass(frozen=True)
class GPTQConfig:
    """The solver's options (AutoGPTQ's names in brackets)."""

    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it [damp_percent]
    block_size: int = 128  # columns per lazy batch update [blocksize]
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal [desc_act]
    static_groups: bool = False  # with act_order: group parameters fixed before [static_groups]

    def to_json(self) -> dict[str, object]:
        return {
            "damp_percent": self.damp,
            "block_size": self.block_size,
            "desc_act": self.act_order,
            "static_groups": self.static_groups,
        }


@dataclass
class GPTQResult:
    weight: QuantizedTensor
    damp_used: float  # the dampening that made H positive definite (>= the requested one)
    error: float  # sum over columns of (w - q)^2 / [H^-1]_cc^2 / 2 (the reference's Losses)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, LAPACK's blocked Cholesky (MKL's) gives different bits with different thread
    counts: run it on one thread, so a run's codes do not depend on how many threads its
    process has (one process, or each of ``--nproc N``). The GPU's solvers do not depend on
    the CPU threads."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _inverse_cholesky(
    make: Callable[[], torch.Tensor], damp: float, name: str, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, made in the memory of
    ``make()``: a fresh copy of ``H`` that is the caller's to lose (one is made for every try).
    A Hessian that is not positive definite (too few or degenerate samples) is dampened ten
    times more, up to 1.0."""
    with _one_thread(device):
        return _inverse_cholesky_here(make, damp, name)


def _inverse_cholesky_here(
    make: Callable[[], torch.Tensor], damp: float, name: str
) -> tuple[torch.Tensor, float]:
    d = damp
    while True:
        # LAPACK works on column-major matrices: torch copies any other layout first, and
        # writes an out= of another layout through one more copy. H is symmetric, so its
        # transpose is the same matrix in column-major order: dampening, the factor, the
        # inverse and its factor all run in the memory of that one copy (the factor comes
        # back as a column-major view), with the same bits as the out-of-place calls
        a = make().t()
        mean_diag = float(torch.mean(torch.diag(a)))
        # + (d * mean) I with no identity matrix: the off-diagonal entries get the + 0.0 that
        # adding the identity's zeros gives (-0.0 becomes 0.0), the diagonal the same sum
        shift = torch.tensor(d * mean_diag, dtype=a.dtype, device=a.device)
        a.add_(shift * 0.0)
        a.diagonal().add_(shift)
        info = torch.empty((), dtype=torch.int32, device=a.device)
        torch.linalg.cholesky_ex(a, out=(a, info))
        if int(info) == 0:
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
            if int(info) == 0:
                return a, d
        del a
        if d >= 1.0:
            raise QToolError(
                f"{name}: the Hessian stays singular even with damp 1.0",
                hint="use more calibration samples",
            )
        d = min(1.0, d * 10.0)


def gptq_quantize(
    name: str,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    config: GPTQConfig,
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` on ``grid`` given the input Hessian ``[in, in]``.

    Follows ``fasterquant``: dead inputs (zero Hessian diagonal) get weight 0; with act-order
    the columns are visited by decreasing ``diag(H)``; a block's parameters are fitted on the
    current (error-updated) columns when the block starts, or up front on the original weight
    with static groups (always for tensor-wide grids and whole-row blocks). Under act-order
    without static groups the blocks follow the visiting order (integer grids only: AutoGPTQ's
    ``g_idx``); a GGUF block is a fixed range of columns, so act-order there needs static
    groups."""
    grid.check(name, tuple(weight.shape))
    # the columns as rows (``wt`` ``[in, out]``): a column is contiguous, so its rank-1 updates
    # run across the weight's rows in vector registers; ``w`` is the ``[out, in]`` view of it
    wt = weight.detach().to(torch.float32).t().clone(memory_format=torch.contiguous_format)
    w = wt.t()
    if not torch.isfinite(w).all():
        raise BadInputError(f"{name}: the weight has NaN or infinite values")
    # the caller's Hessian serves several grids and the error reports: never changed here.
    # The solve's own matrix (dead inputs fixed, act-order's permutation) is made once for
    # each try of the factorization, which then runs in its memory: one matrix beside H
    h = hessian if hessian.device == w.device else hessian.to(w.device)
    rows, cols = w.shape
    blk = grid.columns(cols)
    n_blocks = -(-cols // blk)
    static = grid.tensor_wide or n_blocks == 1 or config.static_groups
    if config.act_order and not static and grid.kind != "int":
        raise BadInputError(
            f"{name}: act-order on {grid.key} blocks needs static groups (the blocks are fixed "
            "column ranges)",
            hint="add static groups (--static-groups), or turn act-order off",
        )

    diag = torch.diag(h).to(torch.float32)
    dead = diag == 0
    any_dead = bool(dead.any())
    diag[dead] = 1.0
    w[:, dead] = 0.0
    importance = diag / 2.0  # mean x^2 per input channel
    importance[dead] = 0.0

    state = grid.prepare(w)
    fits: list[Fit | None] = [None] * n_blocks
    if grid.tensor_wide:
        fits = [grid.fit(w, importance, state)] * n_blocks
    elif static:
        for b in range(n_blocks):
            sl = slice(b * blk, min(cols, (b + 1) * blk))
            fits[b] = grid.fit(w[:, sl], importance[sl], state)

    perm = torch.arange(cols, device=w.device)
    if config.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        wt = wt[perm]
        w = wt.t()

    def solver_matrix() -> torch.Tensor:
        if config.act_order:  # one gather, no row-permuted matrix in between
            m = h[perm[:, None], perm].to(torch.float32)
        else:
            m = h.to(torch.float32, copy=True)
        if any_dead:
            m.diagonal()[dead[perm]] = 1.0
        return m

    hinv, damp_used = _inverse_cholesky(solver_matrix, config.damp, name, w.device)

    codes_t = torch.zeros(cols, rows, dtype=torch.int32, device=w.device)  # by position
    # the block of each visited position, and the column's index inside it: the original
    # column's when blocks are static, the visiting position's otherwise
    orig = perm if static else torch.arange(cols, device=w.device)
    pos_block = (orig // blk).tolist()
    pos_j = (orig % blk).tolist()
    compiled = _Compiled.open(w, n_blocks, blk, pos_block, pos_j)
    if compiled is not None:
        for b, f in enumerate(fits):
            if f is not None and not compiled.add(b, f):
                compiled = None
                break
    losses = torch.zeros(cols, dtype=torch.float32, device=w.device)
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        wt1 = wt[i1:i2]  # this lazy batch's columns, updated in place
        errt = torch.zeros_like(wt1)
        hinv1 = hinv[i1:i2, i1:i2].contiguous()
        i = 0
        while i < i2 - i1:
            col = i1 + i
            b = pos_block[col]
            if fits[b] is None:  # a dynamic block starts: fit its columns as they are now
                # (updated by every column before it, in this batch and the earlier ones)
                end = min(col + blk, cols)
                fits[b] = grid.fit(wt[col:end].t(), importance[perm[col:end]], state)
                if compiled is not None and not compiled.add(b, fits[b]):
                    compiled = None
            # the columns whose parameters are known now: the batch's rest (static blocks), or
            # up to the next dynamic block's start
            stop = i2 - i1 if static else min(i2, (b + 1) * blk) - i1
            if compiled is not None:
                compiled.columns(wt1, hinv1, errt, codes_t, i, stop, i1)
                i = stop
                continue
            for i in range(i, stop):  # noqa: B020 - the loop goes on from where it stops
                col = i1 + i
                fit = fits[pos_block[col]]
                assert fit is not None
                x = wt1[i]
                q, xq = fit.quantize(pos_j[col], x)
                codes_t[col] = q.to(torch.int32)
                e = (x - xq) / hinv1[i, i]
                # w - h e, the product rounded before the difference (addr_ may fuse them
                # into one FMA on some elements and not others: CPU-dependent bits)
                wt1[i:].sub_(torch.outer(hinv1[i, i:], e))
                errt[i] = e
            i = stop
        # the reference's Losses: (w - q)^2 / [H^-1]_cc^2 / 2 summed over rows, i.e. e^2 / 2
        losses[i1:i2] = errt.square().sum(dim=1) / 2.0
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), errt, alpha=-1.0)
    objective = float(losses.sum())

    g_idx: torch.Tensor | None = None  # None: natural order c // block
    if config.act_order:
        inv = torch.argsort(perm)
        codes_t = codes_t[inv]
        if not static:
            g_idx = torch.tensor(pos_block, device=w.device)[inv].to(torch.int32).cpu()
    final = [f for f in fits if f is not None] if not grid.tensor_wide else fits[:1]
    qw = grid.assemble(name, (rows, cols), final, codes_t.t().cpu(), g_idx)  # type: ignore[arg-type]
    return GPTQResult(qw, damp_used, objective)


class _Compiled:
    """The compiled column loop (:func:`qtool.kernels.columns.gptq_rows`) on the CPU, for fits
    of an affine form (every integer grid, the GGUF block types with integer codes): every
    block's parameters gathered in ``scale``/``base`` ``[m, rows]`` as the fits arrive, and the
    parameter row of each visited position in ``sel``. The same float32 operations as the tensor
    loop, in the same order: the same codes, bit for bit (``tests/kernels/test_columns.py``)."""

    def __init__(
        self, w: torch.Tensor, n_blocks: int, blk: int, pos_block: list[int], pos_j: list[int]
    ) -> None:
        self.rows = w.shape[0]
        self.n_blocks, self.blk = n_blocks, blk
        self.pos_block, self.pos_j = pos_block, pos_j
        self.form: tuple[int, float, float, bool] | None = None  # k, lo, hi, offset_form
        self.scale = self.base = torch.empty(0)
        self.sel = np.empty(0, np.int64)

    @classmethod
    def open(
        cls, w: torch.Tensor, n_blocks: int, blk: int, pos_block: list[int], pos_j: list[int]
    ) -> _Compiled | None:
        from qtool.kernels import columns

        if not columns.AVAILABLE or w.device.type != "cpu":
            return None
        return cls(w, n_blocks, blk, pos_block, pos_j)

    def add(self, b: int, fit: Fit) -> bool:
        """Take block ``b``'s parameters; False if the fit has no affine form the loop runs
        (or not the form of the blocks before it)."""
        form = fit.affine()
        if form is None:
            return False
        k = int(form.scale.shape[1])
        key = (k, float(form.lo), float(form.hi), bool(form.offset_form))
        if self.form is None:
            if k != 1 and k != self.blk:
                return False
            self.form = key
            self.scale = torch.zeros(self.n_blocks * k, self.rows, dtype=torch.float32)
            self.base = torch.zeros_like(self.scale)
            pb = np.asarray(self.pos_block, np.int64)
            self.sel = pb if k == 1 else pb * k + np.asarray(self.pos_j, np.int64)
        elif key != self.form:
            return False
        self.scale[b * k : (b + 1) * k] = form.scale.t().to(torch.float32)
        self.base[b * k : (b + 1) * k] = form.base.t().to(torch.float32)
        return True

    def columns(
        self,
        wt1: torch.Tensor,
        hinv1: torch.Tensor,
        errt: torch.Tensor,
        codes_t: torch.Tensor,
        a: int,
        b: int,
        col0: int,
    ) -> None:
        """Batch columns ``a..b-1`` (position ``col0 + i``): codes, errors, updates."""
        from qtool.kernels.columns import gptq_rows

        assert self.form is not None
        _, lo, hi, offset_form = self.form
        scratch = np.empty(self.rows, np.float32)
        gptq_rows(
            wt1.numpy(),
            hinv1.numpy(),
            errt.numpy(),
            codes_t.numpy(),
            self.scale.numpy(),
            self.base.numpy(),
            self.sel,
            np.float32(lo),
            np.float32(hi),
            offset_form,
            a,
            b,
            col0,
            scratch,
        )
