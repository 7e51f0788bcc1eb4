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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

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


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``. A Hessian that is not
    positive definite (too few or degenerate samples) is dampened ten times more, up to 1.0."""
    with _one_thread(h.device):
        return _inverse_cholesky_here(h, damp, name)


def _inverse_cholesky_here(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    mean_diag = float(torch.mean(torch.diag(h)))
    d = damp
    while True:
        # H + (d * mean) I, with no identity matrix nor scaled copy of it: the off-diagonal
        # entries get the + 0.0 that adding the identity's zeros gives (-0.0 becomes 0.0), the
        # diagonal the same float32 sum. At most two n x n matrices beside H at any time.
        shift = torch.tensor(d * mean_diag, dtype=h.dtype, device=h.device)
        hd = h + shift * 0.0
        hd.diagonal().add_(shift)
        lower, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0:
                return upper, d
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
    w = weight.detach().to(torch.float32).clone()
    if not torch.isfinite(w).all():
        raise BadInputError(f"{name}: the weight has NaN or infinite values")
    # the caller's Hessian serves several grids and the error reports: changed only on a copy,
    # and copied only when there is something to change (dead inputs, below)
    h = hessian.to(device=w.device, dtype=torch.float32)
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

    dead = torch.diag(h) == 0
    if bool(dead.any()):
        if h.data_ptr() == hessian.data_ptr():
            h = h.clone()
        h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance = torch.diag(h) / 2.0  # mean x^2 per input channel
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
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv, damp_used = _inverse_cholesky(h, config.damp, name)
    del h

    codes = torch.zeros(rows, cols, dtype=torch.int32, device=w.device)
    # the block of each visited position, and the column's index inside it: the original
    # column's when blocks are static, the visiting position's otherwise
    orig = perm if static else torch.arange(cols, device=w.device)
    pos_block = (orig // blk).tolist()
    pos_j = (orig % blk).tolist()
    losses = torch.zeros(cols, dtype=torch.float32, device=w.device)
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            b = pos_block[col]
            if fits[b] is None:  # a dynamic block starts: fit its columns as they are now
                # updated ones in this lazy batch, the rest (beyond it) as updated by earlier ones
                end = min(col + blk, cols)
                if end <= i2:
                    cur = w1[:, i : i + end - col]
                else:
                    cur = torch.cat([w1[:, i:], w[:, i2:end]], dim=1)
                fits[b] = grid.fit(cur, importance[perm[col:end]], state)
            fit = fits[b]
            assert fit is not None
            x = w1[:, i]
            q, xq = fit.quantize(pos_j[col], x)
            codes[:, col] = q.to(torch.int32)
            d = hinv1[i, i]
            losses[col] = (x - xq).square().sum() / (d * d) / 2.0
            e = (x - xq) / d
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    objective = float(losses.sum())

    g_idx: torch.Tensor | None = None  # None: natural order c // block
    if config.act_order:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if not static:
            g_idx = torch.tensor(pos_block, device=w.device)[inv].to(torch.int32).cpu()
    final = [f for f in fits if f is not None] if not grid.tensor_wide else fits[:1]
    qw = grid.assemble(name, (rows, cols), final, codes.cpu(), g_idx)  # type: ignore[arg-type]
    return GPTQResult(qw, damp_used, objective)
