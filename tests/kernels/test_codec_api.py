"""The codec API: registry, dtypes, shapes, and clear errors on bad input (never silent padding)."""

from __future__ import annotations

import numpy as np
import pytest
from qtool.kernels import QUANT_TYPES, Codec, codec_for, dequantize, get_type, quantize

from qtool.errors import BadInputError

TYPES = list(QUANT_TYPES)


def test_every_type_has_a_codec_with_diagram() -> None:
    for name, qt in QUANT_TYPES.items():
        codec = codec_for(name)
        assert codec.qtype is qt
        assert Codec.registry[name] is codec
        assert type(codec).__doc__, f"{name} codec lacks a docstring"
        assert f"{name}, " in codec.diagram(), f"{name} codec lacks its bit diagram"
        assert str(qt.type_size) in codec.diagram().split(",")[1], codec.diagram()
    # the registry takes a QuantType as well as a name, in any case
    assert codec_for(get_type("q4_k")) is codec_for("Q4_K")


@pytest.mark.parametrize("type_name", TYPES)
def test_round_trip_shapes(type_name: str) -> None:
    qt = get_type(type_name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 512)).astype(np.float32)
    q = quantize(x, type_name, threads=1)
    assert q.dtype == np.uint8
    assert q.shape == (3, 2, qt.row_bytes(512))
    y = dequantize(q, type_name, 512)
    assert y.shape == x.shape and y.dtype == np.float32
    err = np.sqrt(np.mean((y - x) ** 2))
    limit = 1.05 if type_name.startswith("TQ") else 0.5  # ternary keeps only the big values
    assert err < limit, f"{type_name}: rms error {err}"


def test_half_and_bfloat16_inputs_widen_exactly() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x32 = rng.standard_normal((4, 256)).astype(np.float32)
    h = x32.astype(np.float16)
    assert np.array_equal(quantize(h, "Q4_K"), quantize(h.astype(np.float32), "Q4_K"))
    b = torch.from_numpy(x32).to(torch.bfloat16)
    assert np.array_equal(quantize(b, "Q6_K"), quantize(b.float().numpy(), "Q6_K"))
    assert np.array_equal(quantize(b, "BF16"), b.view(torch.int16).numpy().view(np.uint8))


def _raises(match: str, fn, *args, **kwargs) -> BadInputError:  # type: ignore[no-untyped-def]
    with pytest.raises(BadInputError, match=match) as info:
        fn(*args, **kwargs)
    return info.value


def test_row_length_not_a_multiple_of_the_block() -> None:
    x = np.zeros((2, 300), np.float32)
    e = _raises("row length 300 is not a multiple of Q4_K's block size 256", quantize, x, "Q4_K",
                name="blk.0.ffn_up.weight")  # fmt: skip
    assert "blk.0.ffn_up.weight" in str(e) and "pad" in str(e)
    _raises("multiple of Q8_0's block size 32", quantize, np.zeros(33, np.float32), "Q8_0")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(bad: float) -> None:
    x = np.zeros((2, 256), np.float32)
    x[1, 17] = bad
    e = _raises(r"w\.q: the input contains .* at index \(1, 17\)", quantize, x, "Q6_K", name="w.q")
    assert "finite" in str(e)


def test_wrong_dtype_and_shape() -> None:
    _raises("dtype float64 is not accepted", quantize, np.zeros((2, 256)), "Q4_K", name="t")
    _raises("dtype int32 is not accepted", quantize, np.zeros((2, 256), np.int32), "Q4_K")
    _raises("expected a numpy array", quantize, [[0.0] * 256], "Q4_K")
    _raises(r"expected rows of shape \(\.\.\., n\)", quantize, np.array(1.0, np.float32), "Q8_0")
    _raises(r"n > 0", quantize, np.zeros((3, 0), np.float32), "Q8_0")
    _raises("no codec for tensor type 'Q7_X'", quantize, np.zeros(32, np.float32), "Q7_X")


def test_bad_imatrix() -> None:
    x = np.zeros((2, 512), np.float32)
    e = _raises(r"imatrix has shape \(256,\), expected \(512,\)", quantize, x, "Q4_K",
                np.ones(256, np.float32), name="blk.3.attn_v.weight")  # fmt: skip
    assert "blk.3.attn_v.weight" in str(e)
    _raises(r"imatrix has shape \(2, 512\)", quantize, x, "Q4_K", np.ones((2, 512), np.float32))
    _raises("imatrix contains nan", quantize, x, "Q5_K", np.full(512, np.nan, np.float32))
    _raises("imatrix must be floating point", quantize, x, "Q4_K", np.ones(512, np.int64))
    # types that ignore it still check its length
    _raises(r"imatrix has shape \(3,\)", quantize, x, "Q8_0", np.ones(3, np.float32))


def test_bad_dequantize_input() -> None:
    _raises("expected uint8 block bytes", dequantize, np.zeros((2, 144), np.int8), "Q4_K")
    _raises("not a whole number of 144-byte Q4_K blocks", dequantize,
            np.zeros((2, 145), np.uint8), "Q4_K")  # fmt: skip
    _raises("hold 256 values, not 512", dequantize, np.zeros((2, 144), np.uint8), "Q4_K", 512)


def test_backend_choice() -> None:
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    ref = quantize(x, "Q4_K", backend="reference")
    assert np.array_equal(quantize(x, "Q4_K", backend="auto"), ref)
    _raises("backend must be one of", quantize, x, "Q4_K", backend="gpu")
    _raises("w: TQ2_0 has no compiled fast path", quantize, x, "TQ2_0", backend="fast", name="w")
