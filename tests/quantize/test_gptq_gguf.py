"""GPTQ on llama.cpp's grids, checked against llama.cpp itself.

- one weight: with ``H = 2I`` (no error feedback, uniform importance) GPTQ picks the codes
  llama.cpp's own quantizer picks with a uniform importance matrix (libggml, block for block);
  on correlated inputs GPTQ's output error, its blocks decoded by libggml's ``to_float``, is
  below round-to-nearest's on the same type (llama.cpp's bytes, with the same importance);
- a model: ``qtool quantize --method gptq --type PRESET`` gives every tensor llama-quantize's
  type and the file llama.cpp's size; llama.cpp loads and runs it; per linear, the output error
  ``||(W - Ŵ) X||`` of the file's weights (decoded by libggml) is below llama.cpp's own preset
  made with the imatrix of the same calibration tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from qtool.kernels import get_type

from qtool import api
from qtool.grids.gguf import GGUFGrid
from qtool.methods.gptq import GPTQConfig, gptq_quantize
from qtool.observers.stats import HessianAccumulator
from tests.export.helpers import build_tiny, gguf_tensors, llama_logits, llama_quantize

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def ggml():
    from qtool.kernels import _ggml

    return _ggml.load()


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05


def _inputs(n: int, cols: int, seed: int = 1) -> torch.Tensor:
    """Correlated inputs with a few loud channels, as activations have."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols // 8, generator=g)
    x = base.repeat_interleave(8, dim=1) + 0.3 * torch.randn(n, cols, generator=g)
    x[:, :: cols // 8] *= 6.0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1], torch.device("cpu"))
    acc.add(x)
    return acc.hessian()


def _decode(ggml, qtype: str, data: np.ndarray, cols: int) -> torch.Tensor:
    return torch.from_numpy(ggml.dequantize(get_type(qtype), data, cols).reshape(data.shape[0], -1))


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_diagonal_hessian_is_nearest_on_llamacpp_blocks(ggml, qtype: str) -> None:
    """No off-diagonal terms, no error feedback: GPTQ keeps the scales llama.cpp's quantizer
    fits (with the same, uniform, importance) and picks the nearest code for every weight, so
    each weight is at least as close as llama.cpp's own code puts it (libggml decodes both)."""
    from qtool.kernels import block_affine

    cols = 512
    w = _weight(16, cols)
    h = 2.0 * torch.eye(cols)  # importance diag(H) / 2 = 1
    got = gptq_quantize("w", w, h, GGUFGrid(qtype), GPTQConfig()).weight
    ref = np.asarray(ggml.quantize(get_type(qtype), w.numpy(), np.ones(cols, np.float32)))
    s_got, o_got, _, _ = block_affine(got.data, qtype)
    s_ref, o_ref, _, _ = block_affine(ref.reshape(16, -1), qtype)
    assert np.array_equal(s_got, s_ref) and np.array_equal(o_got, o_ref)  # llama.cpp's fit
    err_got = (w - _decode(ggml, qtype, got.data, cols)).abs()
    err_ref = (w - _decode(ggml, qtype, ref.reshape(16, -1), cols)).abs()
    assert bool((err_got <= err_ref + 1e-6).all()), float((err_got - err_ref).max())


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_gptq_beats_rtn_on_the_same_type(ggml, qtype: str) -> None:
    cols, rows = 512, 32
    w = _weight(rows, cols, seed=2)
    x = _inputs(2048, cols)
    h = _hessian(x)
    grid = GGUFGrid(qtype)
    q = gptq_quantize("w", w, h, grid, GPTQConfig()).weight
    imp = (torch.diag(h) / 2).numpy()
    rtn = np.asarray(ggml.quantize(get_type(qtype), w.numpy(), imp)).reshape(rows, -1)
    err_g = ((x @ (w - _decode(ggml, qtype, q.data, cols)).T) ** 2).sum()
    err_r = ((x @ (w - _decode(ggml, qtype, rtn, cols)).T) ** 2).sum()
    assert err_g < 0.9 * err_r, (qtype, float(err_g / err_r))


def test_mxfp4_table_grid(ggml) -> None:
    """MXFP4's grid is a table of 16 values per block (E2M1 times the block's power of two).
    With a diagonal Hessian GPTQ keeps llama.cpp's exponents and picks the nearest value, so its
    bytes are ``quantize_row_mxfp4_ref``'s exactly; with real inputs it beats them."""
    qt = get_type("MXFP4")
    cols = 512
    w = _weight(16, cols)
    got = gptq_quantize("w", w, 2.0 * torch.eye(cols), GGUFGrid("MXFP4"), GPTQConfig()).weight
    assert np.array_equal(got.data, ggml.quantize(qt, w.numpy()))
    w = _weight(32, cols, seed=2)
    x = _inputs(2048, cols)
    q = gptq_quantize("w", w, _hessian(x), GGUFGrid("MXFP4"), GPTQConfig()).weight
    rtn = ggml.quantize(qt, w.numpy())
    err_g = ((x @ (w - _decode(ggml, "MXFP4", q.data, cols)).T) ** 2).sum()
    err_r = ((x @ (w - _decode(ggml, "MXFP4", rtn, cols)).T) ** 2).sum()
    assert err_g < 0.9 * err_r, float(err_g / err_r)


def test_act_order_needs_static_blocks_on_gguf() -> None:
    from qtool.errors import BadInputError

    w, h = _weight(8, 512), _hessian(_inputs(512, 512))
    with pytest.raises(BadInputError, match="static groups"):
        gptq_quantize("w", w, h, GGUFGrid("Q4_K"), GPTQConfig(act_order=True))
    # with static groups the blocks are fitted up front and GPTQ still beats RTN
    got = gptq_quantize(
        "w", w, h, GGUFGrid("Q4_K"), GPTQConfig(act_order=True, static_groups=True)
    ).weight
    assert got.data.shape == (8, 512 // 256 * 144)


# --- a model ---------------------------------------------------------------------------------

TP = ("--tokenizer-pre", "smollm")


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer Llama (its more_bits layers differ), its F32 GGUF, and calibration stats with
    Hessians on the canterbury set (what GPTQ sees as the first layer's inputs)."""
    d = tmp_path_factory.mktemp("gptq-gguf")
    model = build_tiny(d / "model", "llama", assets.smollm2_hf, num_hidden_layers=4)
    f32 = d / "model-f32.gguf"
    api.export(str(model), type="F32", output=f32, tokenizer_pre="smollm")
    stats = d / "calib.safetensors"
    imat = d / "imatrix.gguf"
    api.calibrate(
        str(model),
        dataset="canterbury",
        samples=16,
        seq_len=128,
        output=stats,
        imatrix=imat,
        hessian=True,
    )
    return model, f32, stats, imat


def _hessians(stats: Path) -> dict[str, torch.Tensor]:
    """HF module -> 2/n sum x x^T (float inputs), shared inputs resolved."""
    from qtool.observers.statsfile import load_stats

    cal = load_stats(stats)
    out = {}
    for name, st in cal.layers.items():
        owner = cal.layers[st.shares_input_with] if st.shares_input_with else st
        if owner.hessian is not None:
            out[name] = torch.from_numpy(owner.hessian).double() * (2.0 / owner.count)
    return out


def _decoded_linears(ggml, path: Path) -> dict[str, torch.Tensor]:
    """blk.* linear weights of a GGUF, decoded by libggml, in HF row order (Q/K unpermuted)."""
    from gguf import GGUFReader

    from qtool.models.llama import unpermute_qk

    out = {}
    for t in GGUFReader(str(path)).tensors:
        if not t.name.startswith("blk.") or len(t.shape) != 2 or "norm" in t.name:
            continue
        cols = int(t.shape[0])
        qt = get_type(t.tensor_type.name)
        data = np.asarray(t.data).reshape(int(t.shape[1]), -1)
        w = (
            _decode(ggml, qt.name, data, cols)
            if qt.block_size > 1
            else torch.from_numpy(np.asarray(t.data, np.float32).reshape(-1, cols))
        )
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, 4)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, 2)
        out[t.name] = w.double()
    return out


@pytest.mark.parametrize(
    "preset",
    ["Q4_K_M", *(pytest.param(p, marks=pytest.mark.slow) for p in ("Q3_K_M", "Q4_0", "Q6_K"))],
)
def test_model_gptq_gguf_matches_llamacpp_types_and_beats_its_preset(
    ggml, tiny, tmp_path: Path, preset: str
) -> None:
    from qtool.calibrate.imatrix import read_imatrix
    from qtool.checkpoint import open_checkpoint
    from qtool.models import family_for

    model, f32, stats, imat = tiny
    mine = tmp_path / "gptq.gguf"
    res = api.quantize(
        str(model),
        method="gptq",
        type=preset,
        dataset="canterbury",
        samples=16,
        seq_len=128,
        imatrix="calibration",
        tokenizer_pre="smollm",
        output=mine,
    )
    assert res.outputs[0]["methods"]["gptq"] == 28  # 7 linears x 4 layers
    ref = tmp_path / "ref.gguf"
    llama_quantize(f32, ref, preset, imatrix=read_imatrix(imat))
    a, b = gguf_tensors(ref), gguf_tensors(mine)
    assert set(a) == set(b)
    assert {n: a[n][0] for n in a} == {n: b[n][0] for n in b}  # llama-quantize's types
    assert {n: len(a[n][1]) for n in a} == {n: len(b[n][1]) for n in b}
    # llama.cpp loads and runs it
    logits = llama_logits(mine, [5, 6, 7, 8, 9, 10])
    assert np.isfinite(logits).all()
    # per linear: output error on the float model's calibration inputs, llama.cpp decoding
    ckpt = open_checkpoint(str(model))
    fam = family_for(ckpt.config)
    hs = _hessians(stats)
    got, base = _decoded_linears(ggml, mine), _decoded_linears(ggml, ref)
    wins, total = 0, 0
    for hf in ckpt.tensors:
        if not fam.is_linear(hf, tuple(ckpt.tensors[hf].shape)):
            continue
        g = fam.gguf_name(hf)
        w = ckpt.read(hf).double()
        h = hs[hf.removesuffix(".weight")]
        e_g = float(((w - got[g]) @ h * (w - got[g])).sum())
        e_r = float(((w - base[g]) @ h * (w - base[g])).sum())
        total += 1
        wins += e_g < e_r
    assert wins >= 0.9 * total, f"{preset}: GPTQ below llama.cpp+imatrix on {wins}/{total}"
