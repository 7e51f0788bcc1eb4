"""BitNet b1.58 / 1-bit quantization, its GGUF (TQ1_0/TQ2_0) and safetensors writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qtool import api
from qtool.errors import BadInputError, UnsupportedError
from qtool.formats.bitnet import pack_ternary, unpack_ternary
from qtool.grids.ternary import EPS, binarize, ternarize
from qtool.models import family_for
from tests.export.helpers import build_tiny, llama_logits

_LLAMA = family_for({"model_type": "llama", "num_hidden_layers": 2})


def is_decoder_linear(name: str, ndim: int) -> bool:
    return _LLAMA.is_linear(name, (1,) * ndim)


def write_bitnet_checkpoint(src: Path, out: Path, variant: str = "ternary") -> Path:
    bits = 1 if variant == "binary" else 2
    api.quantize(str(src), method="bitnet", bits=bits, format="safetensors", output=out)
    return out


def export_bitnet_gguf(src: Path, out: Path, qtype: str) -> None:
    api.quantize(str(src), method="bitnet", type=qtype, tokenizer_pre="smollm", output=out)


IDS = [int(i) for i in np.random.default_rng(0).integers(3, 1024, size=48)]


# --- the quantizers ------------------------------------------------------------------------


def test_ternary_matches_the_paper_formula_by_hand() -> None:
    w = torch.tensor([[0.5, -1.5, 0.1, 2.0], [-0.2, 0.0, 0.9, -0.6]])
    tw = ternarize("w", w)
    gamma = (0.5 + 1.5 + 0.1 + 2.0 + 0.2 + 0.0 + 0.9 + 0.6) / 8  # 0.725
    assert tw.gamma == pytest.approx(gamma, rel=1e-7)
    # w / (gamma + eps): 0.69 -1.93 0.14 2.76 / -0.28 0 1.24 -0.83 -> round, clip to [-1, 1]
    assert tw.codes.tolist() == [[1, -1, 0, 1], [0, 0, 1, -1]]
    assert tw.codes.dtype == torch.int8
    assert torch.equal(tw.dequantize(), tw.codes.float() * np.float32(gamma))


def test_ternary_random_codes_and_zero_tensor() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    tw = ternarize("w", w)
    expect = torch.round(w / (w.abs().mean() + EPS)).clamp(-1, 1)
    assert torch.equal(tw.codes.float(), expect)
    assert set(tw.codes.unique().tolist()) == {-1, 0, 1}
    z = ternarize("z", torch.zeros(4, 8))
    assert z.gamma == 0.0 and torch.equal(z.dequantize(), torch.zeros(4, 8))


def test_binary_sign_of_centred_weight() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 3.5]])  # alpha = 3.0833, beta = 3.0833
    bw = binarize("w", w)
    assert bw.alpha == pytest.approx(18.5 / 6) and bw.beta == pytest.approx(18.5 / 6)
    assert bw.codes.tolist() == [[-1, -1, -1], [1, 1, 1]]
    eq = binarize("e", torch.tensor([[1.0, 1.0], [1.0, 1.0]]))  # W - alpha = 0 -> Sign = -1
    assert eq.codes.tolist() == [[-1, -1], [-1, -1]]
    assert torch.equal(bw.dequantize(), bw.codes.float() * np.float32(bw.beta))


def test_bad_weights_raise() -> None:
    with pytest.raises(BadInputError, match="NaN or infinite"):
        ternarize("w", torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(BadInputError, match="not a 2-D"):
        binarize("w", torch.ones(3))


def test_linear_selection() -> None:
    assert is_decoder_linear("model.layers.3.self_attn.q_proj.weight", 2)
    assert is_decoder_linear("model.layers.0.mlp.down_proj.weight", 2)
    assert not is_decoder_linear("model.layers.0.input_layernorm.weight", 1)
    assert not is_decoder_linear("model.embed_tokens.weight", 2)
    assert not is_decoder_linear("lm_head.weight", 2)


def test_pack_round_trip_and_layout() -> None:
    t = torch.randint(-1, 2, (8, 5), generator=torch.Generator().manual_seed(2)).to(torch.int8)
    p = pack_ternary(t)
    assert p.shape == (2, 5) and p.dtype == torch.uint8
    # row j * 2 + r sits in bits 2j of byte row r, as t + 1
    assert int(p[1, 3]) == sum(int(t[j * 2 + 1, 3] + 1) << (2 * j) for j in range(4))
    assert torch.equal(unpack_ternary(p), t)
    with pytest.raises(UnsupportedError, match="multiple of 4"):
        pack_ternary(torch.zeros(6, 2, dtype=torch.int8))


def test_pack_matches_transformers_unpack() -> None:
    from transformers.integrations.bitnet import unpack_weights

    t = torch.randint(-1, 2, (64, 32), generator=torch.Generator().manual_seed(3)).to(torch.int8)
    import torch._dynamo as dynamo

    old = dynamo.config.disable
    dynamo.config.disable = True  # eager: the same code, without a ~8 s CPU compile
    try:
        assert torch.equal(unpack_weights(pack_ternary(t), torch.float32), t.float())
    finally:
        dynamo.config.disable = old


# --- GGUF TQ1_0 / TQ2_0 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bitnet_src(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("bitnet") / "model", "llama", assets.smollm2_hf)


def _gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    from gguf import GGUFReader
    from qtool.kernels import dequantize

    out = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        data = np.asarray(t.data)
        if kind not in ("F32", "F16"):
            data = dequantize(data, kind)
        out[t.name] = (kind, data.astype(np.float32))
    return out


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_tq_stores_gamma_times_codes(tiny_bitnet_src: Path, tmp_path: Path, qtype) -> None:
    from qtool.checkpoint import open_checkpoint
    from qtool.models.llama import permute_qk

    ckpt = open_checkpoint(str(tiny_bitnet_src))
    out = tmp_path / f"m-{qtype}.gguf"
    export_bitnet_gguf(tiny_bitnet_src, out, qtype)
    got = _gguf_tensors(out)
    linears = [n for n, t in ckpt.tensors.items() if is_decoder_linear(n, len(t.shape))]
    assert len(linears) == 14  # 7 linear weights x 2 layers
    heads = {"q_proj": 4, "k_proj": 2}
    for hf in linears:
        kind, dec = got[str(_LLAMA.gguf_name(hf))]
        assert kind == qtype
        w = ckpt.read(hf)
        n = next((v for k, v in heads.items() if k in hf), None)
        tw = ternarize(hf, permute_qk(w, n) if n else w)  # llama.cpp's row order
        gamma = tw.gamma
        # lossless but for d = fp16(gamma) in every 256-block: exact against that ...
        d16 = np.float32(np.float16(gamma))
        assert np.array_equal(dec, tw.codes.numpy().astype(np.float32) * d16), hf
        # ... and within fp16 rounding of gamma * t
        err = np.abs(dec - tw.dequantize().numpy()).max()
        assert err <= gamma * 2.0**-11, (hf, err)
    assert got["token_embd.weight"][0] == "Q4_K" and got["output.weight"][0] == "Q6_K"


def _reference_model(src: Path, decoded: dict[str, tuple[str, np.ndarray]]):
    """transformers on the source weights with every decoder linear weight replaced by
    gamma * t, and the embeddings / output head as the GGUF decodes them (Q4_K / Q6_K)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_decoder_linear(name, p.ndim):
                p.copy_(ternarize(name, p.to(torch.bfloat16)).dequantize())
        model.model.embed_tokens.weight.copy_(torch.from_numpy(decoded["token_embd.weight"][1]))
        model.lm_head.weight.copy_(torch.from_numpy(decoded["output.weight"][1]))
    return model


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_tq_runs_in_llama_cpp_like_transformers(
    tiny_bitnet_src: Path, tmp_path: Path, qtype: str
) -> None:
    out = tmp_path / f"m-{qtype}.gguf"
    export_bitnet_gguf(tiny_bitnet_src, out, qtype)
    model = _reference_model(tiny_bitnet_src, _gguf_tensors(out))
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    got = llama_logits(out, IDS)
    # llama.cpp multiplies TQ / Q4_K / Q6_K weights with activations quantized to Q8_K
    # (8-bit, one scale per 256 values); that is the whole difference. Measured: max |diff|
    # 0.018 (TQ2_0 and TQ1_0 alike) on logits of max |ref| 1.45 (std 0.31), argmax agreement 1.0.
    diff = np.abs(got - ref).max()
    assert diff < 0.03 * max(1.0, np.abs(ref).max()), diff
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


# --- safetensors --------------------------------------------------------------------------


def _bitlinear_reference(src: Path):
    """transformers on the source weights, each decoder linear computing what BitLinear does
    with our codes: 8-bit absmax per-token activations, the weight gamma * t."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and is_decoder_linear(name + ".weight", 2):
            tw = ternarize(name, mod.weight.detach())
            t, inv_gamma = tw.codes.float(), float(np.float32(1.0 / tw.gamma))

            def forward(x: torch.Tensor, t: torch.Tensor = t, g: float = inv_gamma) -> torch.Tensor:
                s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
                xq = (x * s).round().clamp(-128, 127)
                # (x_q t^T) / s * gamma, with gamma as stored (fp32 of 1/gamma) and the integer
                # product formed first, in BitLinear's order: an ulp elsewhere can flip a
                # rounded activation code in the next layer (measured 6e-3 with gamma*t).
                return torch.nn.functional.linear(xq, t) / (g * s)

            mod.forward = forward  # type: ignore[method-assign]
    return model


def _load_eager(path: Path):
    """transformers' loader; BitLinear's torch.compile'd helpers run eagerly (the same ops:
    compiling them on a 2-core CPU takes ~50 s; the slow test runs them compiled)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _bitnet_logits(path: Path, compiled: bool) -> np.ndarray:
    import torch._dynamo as dynamo

    model = _load_eager(path)
    old = dynamo.config.disable
    dynamo.config.disable = not compiled
    try:
        with torch.no_grad():
            return model(torch.tensor([IDS])).logits[0].numpy()
    finally:
        dynamo.config.disable = old


def _check_bitnet_checkpoint(src: Path, dst: Path, compiled: bool) -> None:
    from safetensors import safe_open
    from transformers.integrations.bitnet import BitLinear

    with (
        safe_open(str(dst / "model.safetensors"), "pt") as f,
        safe_open(str(src / "model.safetensors"), "pt") as g,
    ):
        for name in g.keys():  # noqa: SIM118
            w = g.get_tensor(name)
            if is_decoder_linear(name, w.ndim):
                tw = ternarize(name, w)
                packed = f.get_tensor(name)
                assert packed.dtype == torch.uint8 and packed.shape[0] * 4 == w.shape[0]
                assert torch.equal(unpack_ternary(packed), tw.codes)
                scale = f.get_tensor(name.removesuffix(".weight") + ".weight_scale")
                assert scale.dtype == torch.float32 and scale.tolist() == [
                    np.float32(1.0 / tw.gamma)
                ]
            else:
                assert torch.equal(f.get_tensor(name), w), name  # unchanged, same dtype
    model = _load_eager(dst)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, BitLinear) and not isinstance(model.lm_head, BitLinear)
    got = _bitnet_logits(dst, compiled)
    with torch.no_grad():
        ref = _bitlinear_reference(src)(torch.tensor([IDS])).logits[0].numpy()
    # Same integer products and the same fp32(1/gamma): only float32 summation order could
    # differ. Measured max |diff| 0.0 (identical) on logits of max 1.44.
    diff = np.abs(got - ref).max()
    assert diff < 1e-4 * max(1.0, np.abs(ref).max()), diff


def test_safetensors_ternary_loads_in_transformers(tiny_bitnet_src: Path, tmp_path: Path) -> None:
    import json

    dst = write_bitnet_checkpoint(tiny_bitnet_src, tmp_path / "bn")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitnet"
    assert cfg["quantization_config"]["linear_class"] == "bitlinear"
    assert cfg["quantization_config"]["quantization_mode"] == "offline"
    assert (dst / "tokenizer.json").exists() and (dst / "tokenizer_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn"]  # no temp folder left
    _check_bitnet_checkpoint(tiny_bitnet_src, dst, compiled=False)


@pytest.mark.slow
def test_safetensors_ternary_compiled_bitlinear(tiny_bitnet_src: Path, tmp_path: Path) -> None:
    dst = write_bitnet_checkpoint(tiny_bitnet_src, tmp_path / "bn")
    _check_bitnet_checkpoint(tiny_bitnet_src, dst, compiled=True)


def test_safetensors_binary_dense(tiny_bitnet_src: Path, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file

    dst = write_bitnet_checkpoint(tiny_bitnet_src, tmp_path / "b1", "binary")
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["qtool_quantization"]["method"] == "bitnet-1bit"
    assert "No standard loader" in (dst / "README.md").read_text()
    src, out = (
        load_file(src_file := str(tiny_bitnet_src / "model.safetensors")),
        load_file(str(dst / "model.safetensors")),
    )
    assert src_file and set(src) == set(out)
    for name, w in src.items():
        if is_decoder_linear(name, w.ndim):
            bw = binarize(name, w)
            assert out[name].dtype == w.dtype
            assert torch.equal(out[name], (bw.codes.float() * bw.beta).to(w.dtype))
            assert out[name].float().abs().unique().numel() == 1
        else:
            assert torch.equal(out[name], w)


def test_safetensors_refuses_and_leaves_nothing(tiny_bitnet_src: Path, tmp_path: Path) -> None:
    import json
    import shutil

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(BadInputError, match="not a folder"):
        write_bitnet_checkpoint(tiny_bitnet_src, tmp_path / "taken")
    qwen = tmp_path / "qwen-src"
    shutil.copytree(tiny_bitnet_src, qwen)
    cfg = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(UnsupportedError, match="llama"):
        write_bitnet_checkpoint(qwen, tmp_path / "x")
    # a failure mid-write (a damaged tensor) removes the temporary folder
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-src"
    shutil.copytree(tiny_bitnet_src, bad)
    state = load_file(str(bad / "model.safetensors"))
    name = next(n for n in state if "layers.1.mlp" in n)
    state[name] = state[name] * float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BadInputError, match="NaN"):
        write_bitnet_checkpoint(bad, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-src", "qwen-src", "taken"]
