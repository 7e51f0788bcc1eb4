"""gpt-oss against llama.cpp and transformers, on tiny random checkpoints in both layouts:
float experts (what transformers saves: ``gate_up_proj`` ``[E, H, 2F]`` input-major, gate and up
interleaved) and MXFP4 experts (OpenAI's release: ``*_blocks`` / ``*_scales``).

- qtool's F32/F16 GGUF equals llama.cpp's ``convert_hf_to_gguf.py`` (names, shapes, types,
  bytes, metadata but :data:`INTENDED`); MXFP4 experts are carried over as GGML_TYPE_MXFP4,
  byte for byte as the converter repacks them;
- qtool's MXFP4 decoder is transformers' (``integrations/mxfp4.py``) bit for bit, and libggml's
  ``dequantize_row_mxfp4`` of the repacked bytes;
- llama.cpp runs qtool's file with transformers' logits; dropping any of sinks, YaRN, the
  sliding window, the SwiGLU clamp or the biases moves them far beyond the tolerance;
- the MXFP4_MOE, Q8_0 and Q4_K_M presets are byte-identical to ``llama_model_quantize``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.export.helpers import compare_files, llama_quantize
from tests.export.test_dense_families import IDS, hf_logits, hf_model, llama_logits_f32, without
from tests.moe.helpers import (
    GPT_OSS_YARN,
    assert_same_as_converter,
    build_tiny_gpt_oss,
    converter_pair,
)

TP = ("--tokenizer-pre", "smollm")
LAYOUTS = ("float", "mxfp4")


def _export(model: Path, out: Path, outtype: str) -> None:
    from qtool.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["-q", "export", str(model), "--outtype", outtype, "-o", str(out), *TP])
    assert e.value.code == 0


@pytest.fixture(scope="module")
def oss(assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{layout: (checkpoint, qtool's F32 GGUF of it)}."""
    d = tmp_path_factory.mktemp("gpt-oss")
    out = {}
    for layout in LAYOUTS:
        model = build_tiny_gpt_oss(d / layout, assets.smollm2_hf, mxfp4=layout == "mxfp4")
        f32 = d / f"{layout}-f32.gguf"
        _export(model, f32, "F32")
        out[layout] = (model, f32)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_llama_cpp_converter(oss, llama_src: Path, tmp_path: Path, layout: str) -> None:
    from gguf import GGUFReader

    model, f32 = oss[layout]
    for outtype in ("F32", "F16"):
        ref, mine = converter_pair(llama_src, model, f32, outtype, tmp_path, _export)
        b = assert_same_as_converter(ref, mine)
        mine_t = {t.name: t for t in GGUFReader(str(mine)).tensors}
        experts = sorted(n for n in mine_t if "_exps.weight" in n)
        assert len(experts) == 2 * 3
        want = "MXFP4" if layout == "mxfp4" else outtype
        assert {mine_t[n].tensor_type.name for n in experts} == {want}
        assert {"blk.0.attn_sinks.weight", "blk.1.ffn_up_exps.bias"} <= set(mine_t)
        assert b["gpt-oss.rope.scaling.type"] == "yarn"
        assert b["gpt-oss.attention.sliding_window"] == 16
        # a float export of MXFP4 experts records what it holds, as the converter does
        assert b["general.file_type"] == (
            38 if layout == "mxfp4" else {"F32": 0, "F16": 1}[outtype]
        )


def test_mxfp4_decoder_matches_transformers_and_libggml() -> None:
    """Every byte and every exponent 0..254 (255 is E8M0's NaN): qtool's decoding of the
    release's layout is transformers' ``convert_moe_packed_tensors`` in float32 bit for bit, and
    libggml's ``dequantize_row_mxfp4`` of qtool's repacked blocks value for value (ggml's int8
    table decodes code 8, E2M1's -0, to +0.0: the only bits that differ)."""
    import torch
    from qtool.kernels import get_type
    from qtool.kernels._ggml import load
    from qtool.kernels.fp4 import hf_decode, hf_to_ggml
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    e, rows, nb = 3, 255, 4
    blocks = torch.randint(0, 256, (e, rows, nb, 16), generator=g, dtype=torch.uint8)
    blocks[0, :, 0, :] = torch.arange(256, dtype=torch.uint8).reshape(16, 16).repeat(16, 1)[:rows]
    scales = torch.randint(0, 255, (e, rows, nb), generator=g, dtype=torch.uint8)
    scales[0, :, 0] = torch.arange(255, dtype=torch.uint8)  # every exponent on all 256 bytes
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, cols, rows]
    ours = hf_decode(blocks.numpy(), scales.numpy())  # [E, rows, cols]
    assert ours.shape == (e, rows, nb * 32)
    ref_bits = ref.transpose(1, 2).contiguous().numpy().view(np.uint32)
    assert np.array_equal(ours.view(np.uint32), ref_bits)  # -0.0 and 0.0 told apart
    ggml = load().dequantize(get_type("MXFP4"), hf_to_ggml(blocks.numpy(), scales.numpy()).reshape(
        e * rows, -1), nb * 32)  # fmt: skip
    ggml = ggml.reshape(ours.shape)
    assert np.array_equal(ggml, ours)  # as numbers (-0.0 == 0.0)
    signed_zero = (ggml.view(np.uint32) != ours.view(np.uint32)) & (ours == 0)
    assert np.array_equal(ggml.view(np.uint32) != ours.view(np.uint32), signed_zero)
    assert signed_zero.any() and (ours.view(np.uint32)[signed_zero] == 0x80000000).all()


def test_mxfp4_checkpoint_decodes_as_transformers_loads_it(oss) -> None:
    """The experts qtool decodes from the MXFP4 checkpoint (F32 exports, calibration) are the
    float experts transformers builds when it loads it (``[E, in, out]``, gate = outputs 0::2)."""
    import gguf

    model, f32 = oss["mxfp4"]
    hf = hf_model(model)
    reader = gguf.GGUFReader(str(f32))
    from qtool.kernels import dequantize

    for t in reader.tensors:
        if "_exps.weight" not in t.name:
            continue
        layer, role = int(t.name.split(".")[1]), t.name.split(".")[2].split("_")[1]
        experts = hf.model.layers[layer].mlp.experts
        e, rows, cols = (int(s) for s in reversed(list(t.shape)))
        got = dequantize(np.asarray(t.data).reshape(e * rows, -1), "MXFP4", cols).reshape(
            e, rows, cols
        )
        if role == "down":
            want = experts.down_proj.detach().transpose(1, 2)
        else:
            fused = experts.gate_up_proj.detach().transpose(1, 2)  # [E, 2F, H]
            want = fused[:, 0::2] if role == "gate" else fused[:, 1::2]
        assert np.array_equal(got, want.numpy()), t.name


def _sinks_off(model: Any) -> Any:
    other = copy.deepcopy(model)
    for layer in other.model.layers:
        layer.self_attn.sinks.data.fill_(-1e30)  # exp(sink) = 0: no sink in the softmax
    return other


def _biases_off(model: Any) -> Any:
    other = copy.deepcopy(model)
    for n, p in other.named_parameters():
        if n.endswith("bias"):
            p.data.zero_()
    return other


FEATURE_OFF = {
    "sinks": _sinks_off,
    "yarn": lambda m: without(m, rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    "sliding window": lambda m: without(m, layer_types=["full_attention"] * 2),
    "swiglu clamp": lambda m: without(m, swiglu_limit=1e30),
    "biases": _biases_off,
}


def _close(got: np.ndarray, ref: np.ndarray, tol: float) -> float:
    d = float(np.abs(got - ref).max())
    assert d < tol * max(1.0, float(np.abs(ref).max())), d
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.97
    return d


def test_llama_cpp_logits_match_transformers(oss) -> None:
    """Float experts, F32 file and KV cache against transformers (float32, eager attention) on
    96 tokens (the sliding window is 16): max |dlogit| < 2e-3 x max(1, max |logit|), top-1
    97%. Each feature dropped from the transformers model moves its logits > 10x that far."""
    model, f32 = oss["float"]
    hf = hf_model(model)
    got = llama_logits_f32(f32, IDS)
    d = _close(got, hf_logits(hf, IDS), 2e-3)
    for feature, off in FEATURE_OFF.items():
        moved = float(np.abs(hf_logits(off(hf), IDS) - got).max())
        assert moved > 10 * d, (feature, moved, d)


def test_llama_cpp_logits_mxfp4(oss, tmp_path: Path) -> None:
    """MXFP4 experts. llama.cpp's own dequantization of qtool's file (``llama_model_quantize``
    to F32, ``allow_requantize``) runs with transformers' logits on its float32 decoding of the
    checkpoint: max |dlogit| < 2e-3 x max(1, max |logit|) (measured 7e-6 for |logit| <= 1.5).
    llama.cpp's MXFP4 kernels run them with activations rounded to Q8_0 blocks (the CPU's
    dot-product type for MXFP4), which on this tiny random model, whose experts sit in the
    SwiGLU clamp and whose routing is discrete, moves the logits by up to 0.27 (measured; top-1
    95%): bounded here at 0.3 x max(1, max |logit|) and top-1 90%."""
    model, f32 = oss["mxfp4"]
    ref = hf_logits(hf_model(model), IDS)
    deq = tmp_path / "dequantized.gguf"
    llama_quantize(f32, deq, "F32", allow_requantize=True)
    _close(llama_logits_f32(deq, IDS), ref, 2e-3)
    got = llama_logits_f32(f32, IDS)
    assert np.abs(got - ref).max() < 0.3 * max(1.0, float(np.abs(ref).max()))
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_yarn_truncate_false_is_llama_cpps_approximation(oss, tmp_path: Path) -> None:
    """The released configs say ``truncate: false`` (transformers: YaRN's correction range not
    rounded); llama.cpp always rounds it (``ggml_rope_yarn_corr_dims``). On the same file
    llama.cpp's logits are those of the rounded range (5e-6) and 10x (measured 80x: 4e-4 at 96
    tokens) further from the unrounded one: qtool exports the config as the converter does, and
    this is the difference every llama.cpp run of gpt-oss has (README, "gpt-oss")."""
    model, f32 = oss["float"]
    hf = hf_model(model)
    got = llama_logits_f32(f32, IDS)
    d = _close(got, hf_logits(hf, IDS), 2e-3)
    unrounded = without(hf, rope_parameters={**GPT_OSS_YARN, "truncate": False})
    moved = float(np.abs(hf_logits(unrounded, IDS) - got).max())
    assert moved > 10 * d, (moved, d)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["rope_parameters"]["truncate"] is True


@pytest.mark.parametrize(
    "layout,preset",
    [
        ("float", "MXFP4_MOE"),
        ("float", "Q8_0"),
        ("float", "Q4_K_M"),
        ("mxfp4", "MXFP4_MOE"),
        ("mxfp4", "Q8_0"),
        ("mxfp4", "Q4_K_M"),
    ],
)
def test_preset_matches_llama_quantize(cli, oss, tmp_path: Path, layout: str, preset: str) -> None:
    """qtool from the checkpoint == llama_model_quantize on qtool's F32 file (which the
    converter test pins to llama.cpp's own). From MXFP4 experts, MXFP4_MOE keeps their bytes
    (llama.cpp copies a tensor already of the chosen type) and Q8_0 requantizes what
    llama.cpp's dequantizer makes of them (``allow_requantize``)."""
    model, f32 = oss[layout]
    ref, mine = tmp_path / "ref.gguf", tmp_path / "mine.gguf"
    llama_quantize(f32, ref, preset, allow_requantize=layout == "mxfp4")
    r = cli("-q", "quantize", model, "--method", "kquant", "--type", preset, "-o", mine, *TP)
    assert r.exit_code == 0, r.stderr
    types, data = compare_files(ref, mine)
    assert not types, types
    assert not data, f"{len(data)} tensors differ in bytes: {data[:5]}"
    from gguf import GGUFReader

    kinds = {t.name: t.tensor_type.name for t in GGUFReader(str(mine)).tensors}
    if preset == "MXFP4_MOE":
        assert {kinds[n] for n in kinds if "_exps.weight" in n} == {"MXFP4"}
        assert kinds["output.weight"] == kinds["blk.0.attn_q.weight"] == "Q8_0"


@pytest.mark.parametrize(
    "change,match",
    [
        ({"swiglu_limit": 10.0}, "swiglu_limit"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "alternate"),
        ({"attention_bias": False}, "attention_bias"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
    ],
)
def test_unfaithful_configs_are_refused(cli, oss, tmp_path: Path, change, match) -> None:
    """A gpt-oss variant llama.cpp would compute differently: one line, exit code non-zero."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(oss["float"][0], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(change)
    (model / "config.json").write_text(json.dumps(cfg))
    r = cli("export", model, "--outtype", "F16", "-o", tmp_path / "x.gguf", *TP)
    assert r.exit_code != 0
    assert match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_source_is_refused(cli, oss, tmp_path: Path) -> None:
    """transformers has no GGUF reader for gpt-oss, through which qtool reads GGUF sources:
    refused by name, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    r = cli("-q", "quantize", oss["float"][1], "--type", "Q4_K_M", "-o", out / "q.gguf")
    assert r.exit_code == 2 and "no GGUF reader" in r.stderr, r.stderr
    assert list(out.iterdir()) == []


def test_integer_safetensors_outputs_are_refused(cli, oss, tmp_path: Path) -> None:
    """The integer safetensors layouts hold nn.Linear weights, not gpt-oss's fused experts: one
    line naming the formats written (GGUF, mxfp4), nothing written."""
    r = cli("quantize", oss["mxfp4"][0], "--method", "rtn", "--bits", "4", "-o", tmp_path / "w4")
    assert r.exit_code != 0 and "written as GGUF or mxfp4" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w4").exists()
