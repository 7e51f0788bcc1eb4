"""The compiled loops of :mod:`qtool.kernels.columns` against the tensor code they replace (the
same float operations, so the same bits) and against exact arithmetic (``math.fsum``)."""

from __future__ import annotations

import math

import pytest
import qtool.kernels.columns as columns
import torch

from qtool.grids.affine import QuantScheme
from qtool.grids.gguf import GGUFGrid
from qtool.methods.gptq import GPTQConfig, gptq_quantize
from qtool.observers.stats import fold


def test_numba_is_there() -> None:
    """numba is a dependency: without it the checks below would compare the tensor code with
    itself."""
    assert columns.AVAILABLE


def _tensor_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columns, "AVAILABLE", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_is_the_tensor_twosum_and_exact(dtype: torch.dtype, monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    hi0 = torch.randn(40, 30, dtype=torch.float64, generator=g) * 1e3
    # strided partial sums over twelve orders of magnitude, as a Hessian's block views are
    parts = [
        torch.randn(80, 30, dtype=dtype, generator=g)[::2] * 10.0 ** (k % 13 - 6) for k in range(20)
    ]
    out = []
    for compiled in (True, False):
        if not compiled:
            _tensor_path(monkeypatch)
        hi, lo = hi0.clone(), torch.zeros_like(hi0)
        for p in parts:
            fold(hi, lo, p)
        out.append((hi, lo))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    hi, lo = out[0]
    for r, c in [(0, 0), (7, 11), (39, 29), (20, 3)]:
        exact = math.fsum([float(hi0[r, c])] + [float(p[r, c]) for p in parts])
        assert float(hi[r, c]) + float(lo[r, c]) == exact


def test_fold_of_a_vector() -> None:
    a = [1e16, 1.0, -2.0, 3.0, 0.5]
    b = [1.0, 1e16, 2.0, 0.0, 0.25]
    hi, lo = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    fold(hi, lo, torch.tensor(a, dtype=torch.float64))
    fold(hi, lo, torch.tensor(b, dtype=torch.float64))
    assert float(hi[0]) == 1e16 and float(lo[0]) == 1.0  # 1e16 + 1 is not a double: kept apart
    for k in range(5):
        assert math.fsum([float(hi[k]), float(lo[k])]) == math.fsum([a[k], b[k]])


def test_fold_refuses_unlike_shapes() -> None:
    """The compiled loop indexes by ``hi``'s shape: a smaller ``p`` would be read past its end
    (a matrix folded into a flat pair crashed the process before this check)."""
    hi, lo = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="shapes"):
        fold(hi, lo, torch.ones(21, dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes"):
        fold(hi.reshape(-1), lo.reshape(-1), torch.ones(6, 6))


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 512, generator=g)
    x[:, :4] *= 12.0
    h = 2.0 / 1024 * x.T @ x
    w = torch.randn(96, 512, generator=g) * 0.02
    return w, h


@pytest.mark.parametrize(
    "grid,config",
    [
        (QuantScheme(4, group_size=128), GPTQConfig()),
        (QuantScheme(4, group_size=64), GPTQConfig(act_order=True)),
        (QuantScheme(3, sym=False, group_size=128), GPTQConfig(act_order=True, static_groups=True)),
        (QuantScheme(4, granularity="channel"), GPTQConfig(block_size=32)),
        (QuantScheme(8, granularity="tensor"), GPTQConfig()),
        (GGUFGrid("Q4_K"), GPTQConfig()),
        (GGUFGrid("Q4_0"), GPTQConfig()),  # blocks of 32 start inside a lazy batch of 128
        (GGUFGrid("Q6_K"), GPTQConfig(act_order=True, static_groups=True)),
    ],
    ids=["int4-g128", "int4-g64-act", "int3-asym-static", "int4-channel-b32", "int8-tensor",
         "Q4_K", "Q4_0", "Q6_K-static"],
)  # fmt: skip
def test_gptq_compiled_loop_is_the_tensor_loop(grid, config, monkeypatch) -> None:
    """Same codes, scales and objective as the tensor column loop (whose correctness
    ``tests/quantize/test_gptq.py`` checks against the paper's Algorithm 1)."""
    w, h = _problem()
    a = gptq_quantize("w", w, h, grid, config)
    _tensor_path(monkeypatch)
    b = gptq_quantize("w", w, h, grid, config)
    sa, sb = a.weight.state(), b.weight.state()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.error == b.error and a.damp_used == b.damp_used
