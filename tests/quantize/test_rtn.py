"""RTN quantization (qtool.grids.affine) and range clipping (qtool.grids.clip) against
formulas written out here, on hand-made and seeded random tensors."""

from __future__ import annotations

import pytest
import torch

from qtool.errors import BadInputError
from qtool.grids.affine import Clip, QuantizedWeight, QuantScheme, quantize_weight
from qtool.grids.clip import fit_range


def _ref_codes(w: torch.Tensor, bits: int, sym: bool, restricted: bool) -> tuple:
    """Per-row reference: s, z and codes from the convention in scheme.py, written directly."""
    maxq = 2**bits - 1
    lo = torch.clamp(w.amin(1), max=0.0)
    hi = torch.clamp(w.amax(1), min=0.0)
    if sym:
        amax = torch.maximum(-lo, hi)
        div = (2 ** (bits - 1) - 1) if restricted else maxq / 2
        s = torch.where(amax == 0, 1.0, amax / div).half().float()
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        s = torch.where(hi == lo, 1.0, (hi - lo) / maxq).half().float()
        z = torch.clamp(torch.round(-lo / s), 0, maxq)
    q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 1 if restricted else 0, maxq)
    return s, z, q


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", ["sym", "restricted", "asym"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_codes_match_the_formula(bits: int, kind: str, gran: str) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 32, generator=g) * torch.linspace(0.1, 3.0, 6)[:, None]
    w[2, 5] = 0.0
    if kind == "asym":
        w[4] = w[4].abs() + 0.5  # an all-positive row: the range still includes 0
    scheme = QuantScheme(
        bits=bits, sym=kind != "asym", restricted=kind == "restricted", granularity=gran,
        group_size=8,
    )  # fmt: skip
    qw = quantize_weight("w", w, scheme)
    rows = {"tensor": w.reshape(1, -1), "channel": w, "group": w.reshape(-1, 8)}[gran]
    s, z, q = _ref_codes(rows, bits, kind != "asym", kind == "restricted")
    assert torch.equal(qw.codes.float(), q.reshape(6, 32))
    groups = {"tensor": 1, "channel": 1, "group": 4}[gran]
    s_rows = s.expand(6) if gran == "tensor" else s
    assert torch.equal(qw.scale, s_rows.reshape(6, groups))
    z_rows = z.expand(6) if gran == "tensor" else z
    assert torch.equal(qw.zero.float(), z_rows.reshape(6, groups))
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    if kind == "restricted":
        assert int(qw.codes.min()) >= 1
    # decode = (q - z) * s, column by column through the group index
    deq = qw.dequantize()
    cols = torch.arange(32) // 8 if gran == "group" else torch.zeros(32, dtype=torch.long)
    expect = (qw.codes.float() - qw.zero.float()[:, cols]) * qw.scale[:, cols]
    assert torch.equal(deq, expect)


def test_sym_4bit_by_hand() -> None:
    w = torch.tensor([[1.5, -3.0, 0.0, 0.7]])
    qw = quantize_weight("w", w, QuantScheme(bits=4, granularity="channel"))
    # s = 3 / 7.5 = 0.4; q = round(w / 0.4) + 8 = [12, 0, 8, 10] (0.7 / 0.4 = 1.75 -> 2)
    assert qw.scale.item() == torch.tensor(0.4).half().float().item()
    assert qw.codes.tolist() == [[12, 0, 8, 10]]
    qr = quantize_weight("w", w, QuantScheme(bits=4, granularity="channel", restricted=True))
    # s = 3 / 7; q = round(w * 7 / 3) + 8 = [12 (1.5 / fp16(3/7) = 3.5008 -> 4), 1, 8, 10]
    assert qr.codes.tolist() == [[12, 1, 8, 10]]
    qa = quantize_weight("w", w, QuantScheme(bits=4, sym=False, granularity="channel"))
    # s = 4.5 / 15 = 0.3; z = round(3 / 0.3) = 10; q = round(w / 0.3) + 10
    assert qa.zero.item() == 10
    s = torch.tensor(0.3).half().float()
    assert qa.codes.tolist() == [[int(torch.round(v / s)) + 10 for v in w[0]]]
    assert qa.dequantize()[0, 2].item() == 0.0  # zero is exact


OUTLIER_ROW = torch.tensor([[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0, 12.0]])


def test_percentile_clips_the_outlier_by_hand() -> None:
    # |w| sorted: 0.1 .. 1.0, 12.0 (11 values). Percentile 90 at position 0.9 * 10 = 9 -> 1.0.
    scheme = QuantScheme(bits=4, granularity="channel", clip=Clip.parse("percentile:90"))
    qw = quantize_weight("w", OUTLIER_ROW, scheme)
    s = torch.tensor(1.0 / 7.5).half().float()
    assert qw.scale.item() == s.item()
    expect = [min(15, max(0, int(torch.round(v / s)) + 8)) for v in OUTLIER_ROW[0]]
    assert qw.codes.tolist() == [expect]
    assert expect[-1] == 15  # the outlier saturates on the top code
    assert expect[:3] == [9, 6, 10]  # 0.1/s = 0.75 -> 1; -0.2/s = -1.5 -> -2; 0.3/s = 2.25 -> 2
    plain = quantize_weight("w", OUTLIER_ROW, QuantScheme(bits=4, granularity="channel"))
    assert plain.scale.item() == torch.tensor(12.0 / 7.5).half().float().item()
    # without clipping |w| <= 0.7 rounds to 0 (0.7 / 1.6 < 0.5): the small values vanish
    assert plain.codes[0, :7].tolist() == [8] * 7


def _sq_err(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return (quantize_weight("w", w, scheme).dequantize() - w).pow(2).sum(1)


def test_mse_beats_none_on_the_outlier_row() -> None:
    # The ten small values of OUTLIER_ROW ten times, then the outlier 12.0. (On the 11-value
    # row alone the outlier's own error dominates and MSE rightly keeps the full range.)
    w = torch.cat([OUTLIER_ROW[:, :10].repeat(1, 10), OUTLIER_ROW[:, 10:]], dim=1)
    none = _sq_err(w, QuantScheme(bits=4, granularity="channel"))
    mse = _sq_err(w, QuantScheme(bits=4, granularity="channel", clip=Clip.parse("mse")))
    assert mse.item() < 0.9 * none.item()  # measured 26.05 against 29.53
    short = _sq_err(OUTLIER_ROW, QuantScheme(bits=4, granularity="channel", clip=Clip("mse")))
    assert short.item() == _sq_err(OUTLIER_ROW, QuantScheme(bits=4, granularity="channel")).item()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("data", ["normal", "student_t"])
def test_mse_never_worse_than_none(sym: bool, data: str) -> None:
    torch.manual_seed(4)
    if data == "normal":
        w = torch.randn(64, 128)
    else:
        w = torch.distributions.StudentT(1.5).sample((64, 128))
    for gran in ("channel", "group"):
        base = QuantScheme(bits=3, sym=sym, granularity=gran, group_size=32)
        mse = QuantScheme(bits=3, sym=sym, granularity=gran, group_size=32, clip=Clip("mse"))
        if gran == "channel":
            assert (_sq_err(w, mse) <= _sq_err(w, base)).all()
        else:
            e_none = (quantize_weight("w", w, base).dequantize() - w).pow(2)
            e_mse = (quantize_weight("w", w, mse).dequantize() - w).pow(2)
            assert (e_mse.reshape(-1, 32).sum(1) <= e_none.reshape(-1, 32).sum(1)).all()
        assert _sq_err(w, mse).sum() < _sq_err(w, base).sum()


def _shrink(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    rows = w.reshape(1, -1) if scheme.granularity == "tensor" else w
    lo, hi = fit_range(rows, scheme)
    return torch.maximum(-lo, hi) / torch.maximum(-rows.amin(1), rows.amax(1))


@pytest.mark.parametrize("sym", [True, False])
def test_kl_shrinks_heavy_tails_not_uniform(sym: bool) -> None:
    torch.manual_seed(5)
    heavy = torch.distributions.StudentT(2.0).sample((16, 512))
    uniform = torch.rand(16, 512) * 2 - 1
    for gran in ("tensor", "channel"):
        scheme = QuantScheme(bits=4, sym=sym, granularity=gran, clip=Clip.parse("kl"))
        assert _shrink(heavy, scheme).median() < 0.8
        assert _shrink(uniform, scheme).min() >= 0.97


@pytest.mark.slow
def test_kl_on_a_1536x576_weight() -> None:
    import time

    # ~3 s on 2 idle cores (~7 s single-threaded); the bound leaves room for a busy machine
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(6))
    w[7] = 0.0
    start = time.monotonic()
    qw = quantize_weight("w", w, QuantScheme(bits=4, granularity="channel", clip=Clip("kl")))
    assert time.monotonic() - start < 30.0
    assert torch.equal(qw.dequantize()[7], torch.zeros(576))
    assert torch.isfinite(qw.scale).all()


@pytest.mark.parametrize("clip", ["none", "percentile:99", "mse", "kl"])
@pytest.mark.parametrize("sym", [True, False])
def test_zero_rows_decode_to_exact_zeros(clip: str, sym: bool) -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    w[1] = 0.0
    w[3, :32] = 0.0  # one all-zero group
    for gran in ("channel", "group", "tensor"):
        scheme = QuantScheme(
            bits=4, sym=sym, granularity=gran, group_size=32, clip=Clip.parse(clip)
        )
        deq = quantize_weight("w", w, scheme).dequantize()
        assert torch.equal(deq[1], torch.zeros(64))
        if gran == "group":
            assert torch.equal(deq[3, :32], torch.zeros(32))
    zero = quantize_weight("z", torch.zeros(2, 8), QuantScheme(bits=4, granularity="tensor"))
    assert torch.equal(zero.scale, torch.ones(2, 1))


@pytest.mark.parametrize("clip", ["none", "percentile:99.5", "mse", "kl"])
def test_scales_exact_in_float16(clip: str) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8)) * 1e-3
    w[0] *= 1e-6  # tiny values: a scale below fp16's normal range is lifted, never 0
    for sym in (True, False):
        scheme = QuantScheme(
            bits=4, sym=sym, granularity="group", group_size=32, clip=Clip.parse(clip)
        )
        s = quantize_weight("w", w, scheme).scale
        assert torch.equal(s.half().float(), s) and (s > 0).all()


def test_percentile_on_a_tensor_above_torch_quantile_limit() -> None:
    # torch.quantile refuses more than 2^24 values; a per-tensor scale of a large weight has more
    w = torch.zeros(1, 2**24 + 8)
    w[0, :11] = OUTLIER_ROW[0]
    lo, hi = fit_range(
        w, QuantScheme(bits=4, granularity="tensor", clip=Clip.parse("percentile:100"))
    )
    assert hi.item() == 12.0
    scheme = QuantScheme(bits=4, granularity="tensor", clip=Clip.parse("percentile:99.99999"))
    lo, hi = fit_range(w, scheme)
    assert 0.0 <= hi.item() < 12.0 and lo.item() == -hi.item()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: QuantScheme(bits=1), "between 2 and 8"),
        (lambda: QuantScheme(bits=9), "between 2 and 8"),
        (lambda: Clip.parse("percentile:0"), r"in \(0, 100\]"),
        (lambda: Clip.parse("percentile:abc"), r"in \(0, 100\]"),
        (lambda: Clip.parse("median"), "unknown clipping"),
        (lambda: QuantScheme(sym=False, restricted=True), "symmetric"),
        (
            lambda: quantize_weight(
                "w", torch.tensor([[1.0, float("nan")]]), QuantScheme(granularity="channel")
            ),
            "NaN",
        ),  # noqa: E501
        (lambda: quantize_weight("w", torch.ones(4), QuantScheme()), "2-D"),
    ],
)
def test_bad_inputs_raise_bad_input_error(make, match: str) -> None:
    with pytest.raises(BadInputError, match=match) as e:
        make()
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_ragged_last_group_follows_the_formula() -> None:
    # A group size that does not divide the columns is allowed (scheme.check_shape, for the
    # GPTQ format): the last group is shorter and gets its own scale.
    w = torch.randn(3, 20, generator=torch.Generator().manual_seed(9))
    qw = quantize_weight("w", w, QuantScheme(bits=4, granularity="group", group_size=8))
    assert qw.scale.shape == (3, 3)
    for k, (a, b) in enumerate([(0, 8), (8, 16), (16, 20)]):
        s, z, q = _ref_codes(w[:, a:b], 4, True, False)
        assert torch.equal(qw.codes[:, a:b].float(), q) and torch.equal(qw.scale[:, k], s)


def test_importance_weighted_mse() -> None:
    """``--clip mse`` with calibration statistics weights each squared error by its input
    channel's mean x^2 (llama.cpp's importance matrix idea): uniform importance is the plain
    search exactly, and a skewed importance lowers the output error ||(W - Q) X|| on inputs
    with that channel power."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g)
    for gran in ("group", "channel", "tensor"):
        scheme = QuantScheme(3, granularity=gran, group_size=128, clip=Clip.parse("mse"))
        plain = quantize_weight("w", w, scheme)
        flat = quantize_weight("w", w, scheme, importance=torch.ones(512))
        assert torch.equal(plain.codes, flat.codes) and torch.equal(plain.scale, flat.scale)
        imp = torch.rand(512, generator=g) ** 4 * 10
        weighted = quantize_weight("w", w, scheme, importance=imp)
        x = torch.randn(4096, 512, generator=g) * imp.sqrt()

        def err(q: QuantizedWeight, x: torch.Tensor = x) -> float:
            return float((x @ (w - q.dequantize()).T).norm())

        # one range per tensor has little to choose from; per group/channel it must gain
        assert err(weighted) < err(plain) if gran != "tensor" else err(weighted) <= err(plain)
    with pytest.raises(BadInputError, match="importance"):
        quantize_weight("w", w, QuantScheme(4, clip=Clip.parse("mse")), importance=torch.ones(3))
