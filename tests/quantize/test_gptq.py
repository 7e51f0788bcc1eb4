"""GPTQ's solver against its definition (Frantar et al. 2022, Algorithm 1), written plainly in
the test, and against RTN where the algorithm must reduce to it or beat it."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.errors import QToolError
from qtool.grids.affine import QuantScheme, fit_params, quantize_weight
from qtool.methods.gptq import GPTQConfig, gptq_quantize
from qtool.observers.stats import HessianAccumulator
from qtool.runner.memory import current_rss, peak_rss


def _correlated(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, :4] *= 15.0  # a few outlier channels, as LLM activations have
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1], torch.device("cpu"))
    for part in x.split(100):
        acc.add(part)
    return acc.hessian()


def _weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_hessian_accumulator_is_two_over_n_xtx() -> None:
    x = _correlated(333, 48)
    torch.testing.assert_close(_hessian(x), 2.0 / 333 * x.T @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_uncorrelated_inputs_reduce_to_rtn(sym: bool, bits: int, granularity: str) -> None:
    """With a diagonal Hessian no error is carried to other columns: GPTQ is RTN, exactly."""
    w = _weight(32, 256)
    scheme = QuantScheme(bits, sym=sym, granularity=granularity, group_size=64)  # type: ignore[arg-type]
    h = torch.eye(256) * 3.0
    got = gptq_quantize("w", w, h, scheme, GPTQConfig()).weight
    want = quantize_weight("w", w, scheme)
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)


def test_diagonal_hessian_with_act_order_and_static_groups_is_rtn() -> None:
    w = _weight(16, 256)
    h = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(3)) + 0.5)
    scheme = QuantScheme(4, group_size=64)
    got = gptq_quantize("w", w, h, scheme, GPTQConfig(act_order=True, static_groups=True))
    assert got.weight.g_idx is None  # static groups keep the natural grouping
    assert torch.equal(got.weight.codes, quantize_weight("w", w, scheme).codes)


def _algorithm_1(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, damp: float):
    """The paper's Algorithm 1 without lazy batching: quantize column j, then update every
    later column with the error times row j of the Cholesky factor of H^-1; group parameters
    are fitted on the current weights when a group starts."""
    w = w.clone().double()
    h = h.clone().double()
    cols = w.shape[1]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(w.shape, dtype=torch.int64)
    g = scheme.group_size
    for j in range(cols):
        if j % g == 0:
            s, z = fit_params(w[:, j : j + g].float(), scheme)
            s, z = s.double(), z.double()
        q = torch.clamp(torch.round(w[:, j] / s) + z, 0, scheme.maxq)
        codes[:, j] = q.long()
        err = (w[:, j] - (q - z) * s) / u[j, j]
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    return codes


@pytest.mark.parametrize("sym", [True, False])
def test_blocked_solver_matches_algorithm_1(sym: bool) -> None:
    """Lazy block updates are an exact rewrite of the column loop: the codes agree except where
    float rounding (float32 here, float64 in the plain version) tips a value at a rounding
    boundary."""
    x = _correlated(2048, 256)
    w = _weight(64, 256)
    h = _hessian(x)
    scheme = QuantScheme(4, sym=sym, group_size=64)
    got = gptq_quantize("w", w, h, scheme, GPTQConfig(block_size=32)).weight
    want = _algorithm_1(w, h, scheme, 0.01)
    same = (got.codes.long() == want).float().mean().item()
    assert same > 0.995, f"only {same:.4f} of the codes agree with Algorithm 1"


@pytest.mark.parametrize(
    "config",
    [
        GPTQConfig(),
        GPTQConfig(act_order=True),
        GPTQConfig(act_order=True, static_groups=True),
        GPTQConfig(block_size=16),
    ],
    ids=["plain", "act-order", "act-order-static", "block16"],
)
@pytest.mark.parametrize("bits,sym", [(4, True), (3, True), (3, False), (2, False)])
def test_output_error_below_rtn(config: GPTQConfig, bits: int, sym: bool) -> None:
    x = _correlated(2048, 256)
    w = _weight(96, 256)
    h = _hessian(x)
    scheme = QuantScheme(bits, sym=sym, group_size=64)
    q = gptq_quantize("w", w, h, scheme, config).weight.dequantize()
    r = quantize_weight("w", w, scheme).dequantize()

    def err(d: torch.Tensor) -> float:
        return float((x @ (w - d).T).norm() / (x @ w.T).norm())

    assert err(q) < 0.9 * err(r), (err(q), err(r))


def test_act_order_g_idx_follows_the_visiting_order() -> None:
    x = _correlated(1024, 128)
    h = _hessian(x)
    scheme = QuantScheme(4, group_size=32)
    res = gptq_quantize("w", _weight(8, 128), h, scheme, GPTQConfig(act_order=True))
    g_idx = res.weight.g_idx
    assert g_idx is not None and g_idx.dtype == torch.int32
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    # the first 32 columns visited form group 0, the next 32 group 1, ...
    assert torch.equal(g_idx[order], torch.arange(128, dtype=torch.int32) // 32)


def test_dead_inputs_get_zero_weight() -> None:
    x = _correlated(512, 128)
    x[:, 5] = 0.0
    res = gptq_quantize(
        "w", _weight(8, 128), _hessian(x), QuantScheme(4, group_size=32), GPTQConfig()
    )
    assert torch.all(res.weight.dequantize()[:, 5] == 0)


def test_indefinite_hessian_is_dampened_more() -> None:
    """A Hessian with a negative eigenvalue (-0.05 x its mean diagonal, beyond the default
    dampening of 0.01) fails the Cholesky factorisation; the solver retries with ten times
    the dampening, succeeds at 0.1, and says which it used."""
    h = torch.eye(128)
    h[0, 0] = -0.05 * 128 / 127  # mean diag ~1, one eigenvalue -0.05
    res = gptq_quantize("w", _weight(8, 128), h, QuantScheme(4, group_size=32), GPTQConfig())
    assert res.damp_used == pytest.approx(0.1)
    assert torch.isfinite(res.weight.dequantize()).all()


def test_hopeless_hessian_refused() -> None:
    h = -torch.eye(64)
    with pytest.raises(QToolError, match="damp 1.0"):
        gptq_quantize("w", _weight(4, 64), h, QuantScheme(4, group_size=32), GPTQConfig())


def test_nan_weight_refused() -> None:
    w = _weight(8, 128)
    w[3, 7] = float("nan")
    with pytest.raises(QToolError, match="NaN"):
        gptq_quantize("layer.w", w, torch.eye(128), QuantScheme(4, group_size=32), GPTQConfig())


def test_ragged_last_group() -> None:
    """576 columns in groups of 128: four whole groups and one of 64 (as AutoGPTQ)."""
    x = _correlated(1024, 576)
    res = gptq_quantize("w", _weight(16, 576), _hessian(x), QuantScheme(4), GPTQConfig())
    assert res.weight.scale.shape == (16, 5)
    assert torch.equal(res.weight.group_index(), torch.arange(576) // 128)


def test_gptq_on_the_ternary_grid_beats_absmean() -> None:
    """GPTQ accepts every grid: on BitNet's ternary grid (gamma fitted up front, the paper's
    absmean) its error feedback lowers the output error below the paper's round-to-nearest."""
    from qtool.grids.ternary import TernaryGrid, ternarize

    g = torch.Generator().manual_seed(3)
    base = torch.randn(1024, 32, generator=g)
    x = base.repeat_interleave(8, dim=1) + 0.3 * torch.randn(1024, 256, generator=g)
    w = torch.randn(16, 256, generator=g)
    acc = HessianAccumulator(256, torch.device("cpu"))
    acc.add(x)
    q = gptq_quantize("w", w, acc.hessian(), TernaryGrid(), GPTQConfig()).weight
    rtn = ternarize("w", w)
    assert q.gamma == rtn.gamma and set(q.codes.unique().tolist()) <= {-1, 0, 1}
    err_q = ((x @ (w - q.dequantize()).T) ** 2).sum()
    err_r = ((x @ (w - rtn.dequantize()).T) ** 2).sum()
    assert err_q < 0.9 * err_r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hessian_of_bf16_inputs_is_the_float32_sum(dtype: torch.dtype) -> None:
    """Inputs from a bfloat16 forward go through oneDNN's bf16 kernels (their products are exact
    in float32): the Hessian is the float64 ``X^T X`` rounded to float32, to float32's
    summation error, as it is for float32 inputs; the global matmul precision is restored."""
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(256, 640, generator=g) * 3).to(dtype) for _ in range(6)]
    before = torch.backends.mkldnn.matmul.fp32_precision
    acc = HessianAccumulator(640, torch.device("cpu"))
    for x in xs:
        acc.add(x)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    ref = sum(x.double().T @ x.double() for x in xs)
    got = acc.xtx()
    assert got.dtype == torch.float32
    rel = float((got.double() - ref).abs().max() / ref.abs().max())
    assert rel < 2e-6, rel
    # what a bf16 product would give (a rounded output): the test can tell the two apart
    bf16 = sum((x.bfloat16().T @ x.bfloat16()).double() for x in xs)
    assert float((bf16 - ref).abs().max() / ref.abs().max()) > 100 * rel


@pytest.mark.parametrize("grid", ["int4-g64", "ternary", "Q4_K"])
def test_solved_weight_is_laid_out_as_a_restored_one(grid: str) -> None:
    """The solver works on the weight transposed; what it returns is row-major, as the same
    tensor restored from a resume folder is: a bf16 linear over a strided weight takes another
    kernel with other bits, so a resumed run recomputing a layer from its saved codes got
    different hidden states (found by the slow resume test, checkpoints every 3 layers)."""
    from qtool.grids.gguf import GGUFGrid
    from qtool.grids.ternary import TernaryGrid

    g = {"int4-g64": QuantScheme(4, group_size=64), "ternary": TernaryGrid(),
         "Q4_K": GGUFGrid("Q4_K")}[grid]  # fmt: skip
    x = _correlated(512, 256)
    q = gptq_quantize("w", _weight(96, 256), _hessian(x), g, GPTQConfig()).weight
    back = g.restore("w", q.state())
    d, r = q.dequantize(), back.dequantize()
    assert d.is_contiguous() and d.stride() == r.stride()
    xb = x[:128].to(torch.bfloat16)
    assert torch.equal(
        torch.nn.functional.linear(xb, d.to(torch.bfloat16)),
        torch.nn.functional.linear(xb, r.to(torch.bfloat16)),
    )


def _reset_peak() -> bool:
    """Restart this process's peak RSS mark (Linux's ``clear_refs``); False where there is none."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.parametrize("act_order", [False, True])
def test_solve_holds_one_matrix_beside_the_hessian_and_leaves_it_unchanged(
    act_order: bool,
) -> None:
    """The inverse's Cholesky factor is made in the memory of the solver's one copy of H
    (permuted for act-order, dead inputs fixed): the solve's peak is H's own bytes plus about
    one matrix (the weight here is small), not the three of a permuted copy, ``H + damp I``
    and its factor side by side. The caller's Hessian, which the error reports read after,
    keeps every bit. 3000 columns: each matrix is mapped and unmapped on its own (over glibc's
    largest mmap threshold), so the process's peak counts every one."""
    cols = 3000
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2 * cols, cols, generator=g)
    x[:, 7] = 0.0  # a dead input
    h = (x.T @ x) * (2.0 / x.shape[0])
    del x
    before = h.clone()
    w = _weight(16, cols)
    config = GPTQConfig(act_order=act_order, static_groups=act_order)
    # compiled loops and first-call buffers first: they are not the solve's
    gptq_quantize("w", w[:, :200], h[:200, :200], QuantScheme(4, group_size=100), config)
    if not _reset_peak():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    base = current_rss()
    res = gptq_quantize("w", w, h, QuantScheme(4, group_size=100), config)
    extra = (peak_rss() - base) / (cols * cols * 4)
    assert extra < 1.5, f"the solve held {extra:.2f} Hessian-sized matrices beside H"
    assert torch.equal(h.view(torch.int32), before.view(torch.int32))
    assert torch.all(res.weight.dequantize()[:, 7] == 0)
