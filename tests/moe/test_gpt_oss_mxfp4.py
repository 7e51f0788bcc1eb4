"""gpt-oss written back in transformers' MXFP4 layout (``--format mxfp4``), from a float
checkpoint: the experts RTN'd are llama-quantize's MXFP4 bytes; the folder is a gpt-oss MXFP4
checkpoint for transformers (its Mxfp4 quantizer, which decodes to float on a CPU) and for
llama.cpp's own converter, whose GGUF runs in llama.cpp with transformers' logits on the folder;
GPTQ chooses codes on RTN's exponents and beats RTN on every expert's Hessian."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.export.helpers import llama_quantize
from tests.export.test_dense_families import IDS, hf_logits, hf_model, llama_logits_f32
from tests.moe.helpers import build_tiny_gpt_oss, llama_convert

TP = ("--tokenizer-pre", "smollm")
DATA = ("-d", "canterbury", "-n", "2", "-L", "16", "--device", "cpu")  # 32 tokens, 4 experts


@pytest.fixture(scope="module")
def oss(assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The float checkpoint, qtool's F32 GGUF of it, and its RTN MXFP4 folder."""
    from qtool.cli.app import main

    d = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    model = build_tiny_gpt_oss(d / "float", assets.smollm2_hf)
    mx = build_tiny_gpt_oss(d / "mxfp4-src", assets.smollm2_hf, mxfp4=True)
    out = {"float": model, "f32": d / "f32.gguf", "rtn": d / "rtn", "mxfp4-src": mx}
    for argv in (
        ["export", str(model), "--outtype", "F32", "-o", str(out["f32"]), *TP],
        ["quantize", str(model), "--format", "mxfp4", "-o", str(out["rtn"])],
    ):
        with pytest.raises(SystemExit) as e:
            main(["-q", *argv])
        assert e.value.code == 0, argv
    return out


def _experts(folder: Path) -> dict[str, Any]:
    """Every tensor of the folder (torch: bf16 has no numpy dtype)."""
    from safetensors.torch import load_file

    t: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        t.update(load_file(f))
    return t


def _as_ggml(t: dict[str, Any], layer: int, role: str) -> np.ndarray:
    """The folder's ``ffn_<role>_exps`` as ggml block_mxfp4 rows ``[E * rows, bytes]``."""
    from qtool.kernels.fp4 import hf_to_ggml

    proj = "down_proj" if role == "down" else "gate_up_proj"
    pre = f"model.layers.{layer}.mlp.experts.{proj}"
    blocks, scales = t[pre + "_blocks"].numpy(), t[pre + "_scales"].numpy()
    if role != "down":
        half = 0 if role == "gate" else 1
        blocks, scales = blocks[:, half::2], scales[:, half::2]
    g = hf_to_ggml(blocks, scales)
    return g.reshape(-1, g.shape[-1])


def test_rtn_is_llama_quantize_mxfp4(oss, tmp_path: Path) -> None:
    """Every expert tensor, gate/up de-interleaved and repacked, is byte for byte what
    ``llama_model_quantize`` MXFP4_MOE writes from the same float weights; every other tensor is
    the source's, bit for bit; config and files are what transformers reads."""
    from gguf import GGUFReader

    ref = tmp_path / "ref.gguf"
    llama_quantize(oss["f32"], ref, "MXFP4_MOE")
    want = {t.name: np.asarray(t.data) for t in GGUFReader(str(ref)).tensors}
    mine = _experts(oss["rtn"])
    n = 0
    for layer in range(2):
        for role in ("gate", "up", "down"):
            w = want[f"blk.{layer}.ffn_{role}_exps.weight"]
            got = _as_ggml(mine, layer, role)
            assert np.array_equal(got, w.reshape(got.shape)), (layer, role)
            n += 1
    assert n == 6
    src = _experts(oss["float"])
    for name, t in src.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert name not in mine
            continue
        assert mine[name].dtype == t.dtype and torch.equal(mine[name], t), name
    cfg = json.loads((oss["rtn"] / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert {"tokenizer.json", "README.md", "recipe.json"} <= {p.name for p in oss["rtn"].iterdir()}


def test_loads_in_transformers_and_llama_cpp(oss, llama_src: Path, tmp_path: Path) -> None:
    """transformers loads the folder (its Mxfp4 quantizer) with the experts libggml decodes from
    it; llama.cpp's ``convert_hf_to_gguf.py`` converts it (MXFP4 experts carried over), and
    llama.cpp runs that file with transformers' logits on the folder (its float32 decoding, with
    llama.cpp's own dequantization of the experts: max |dlogit| < 2e-3 x max(1, max |logit|)).
    The logits differ from the float model's: the experts really are 4-bit."""
    from qtool.kernels import dequantize

    hf = hf_model(oss["rtn"])
    mine = _experts(oss["rtn"])
    for layer in range(2):
        experts = hf.model.layers[layer].mlp.experts
        fused = experts.gate_up_proj.detach().transpose(1, 2)  # [E, 2F, H]
        for role, want in (
            ("gate", fused[:, 0::2]),
            ("up", fused[:, 1::2]),
            ("down", experts.down_proj.detach().transpose(1, 2)),
        ):
            g = _as_ggml(mine, layer, role)
            got = dequantize(g, "MXFP4", want.shape[-1]).reshape(want.shape)
            assert np.array_equal(got, want.numpy()), (layer, role)
    conv = tmp_path / "conv.gguf"
    llama_convert(llama_src, oss["rtn"], conv, "f32")
    deq = tmp_path / "deq.gguf"
    llama_quantize(conv, deq, "F32", allow_requantize=True)
    ref = hf_logits(hf, IDS)
    got = llama_logits_f32(deq, IDS)
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, float(np.abs(ref).max()))
    base = hf_logits(hf_model(oss["float"]), IDS)
    assert np.abs(base - ref).max() > 0.05


def test_gptq_on_rtn_exponents(cli, oss, tmp_path: Path) -> None:
    """GPTQ per expert (every token through every expert): the same E8M0 exponents as RTN (GPTQ
    chooses codes, the codec fits the scales), other codes, an error on each expert's Hessian no
    worse than RTN's; transformers loads the folder and ``qtool eval`` scores it."""
    out = tmp_path / "gptq"
    r = cli("quantize", oss["float"], "--method", "gptq", "--format", "mxfp4", *DATA,
            "--all-experts", "-o", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    d = r.json()
    experts = [x for x in d["layers"] if ".experts." in x["name"]]
    assert len(experts) == 2 * 4 * 3 and all(x["method"] == "gptq" for x in experts)
    assert all(x["gptq_rel_error"] <= x["rtn_rel_error"] * 1.05 for x in experts)
    assert d["outputs"][0]["methods"] == {"gptq": 24}
    g, rtn = _experts(out), _experts(oss["rtn"])
    scales = [k for k in g if k.endswith("_scales")]
    assert len(scales) == 4 and all(torch.equal(g[k], rtn[k]) for k in scales)
    assert any(not torch.equal(g[k], rtn[k]) for k in g if k.endswith("_blocks"))
    r = cli("eval", out, "--base", oss["float"], "--dataset", "canterbury:alice29.txt",
            "--ctx", "32", "--chunks", "2", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    a = r.json()["artifacts"][0]
    assert np.isfinite(a["ppl"]) and a["kld"]["mean"] > 0


@pytest.mark.parametrize(
    "args,match",
    [
        (("--format", "mxfp4", "--bits", "4"), "--bits"),
        (("--format", "gptq", "--method", "gptq", "--bits", "4"), "written as GGUF or mxfp4"),
    ],
)
def test_bad_options(cli, oss, tmp_path: Path, args, match) -> None:
    r = cli("quantize", oss["float"], *args, "-o", tmp_path / "o")
    assert r.exit_code != 0 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_mxfp4_source_and_other_families_refused(cli, oss, assets, tmp_path: Path) -> None:
    """An MXFP4 checkpoint is MXFP4 already; a dense family has no fused experts."""
    r = cli("quantize", oss["mxfp4-src"], "--format", "mxfp4", "-o", tmp_path / "a")
    assert r.exit_code != 0 and "MXFP4 already" in r.stderr, r.stderr
    r = cli("quantize", assets.smollm2_hf, "--format", "mxfp4", "-o", tmp_path / "b")
    assert r.exit_code != 0 and "fused MoE experts" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dense_export_and_back(cli, oss, tmp_path: Path) -> None:
    """``export --format safetensors`` of an MXFP4 checkpoint writes the float layout
    transformers saves (bf16, no quantization_config) with the experts transformers' own
    decoder builds from the release's blocks; writing that back with ``--format mxfp4`` loses
    nothing (every decoded value is on the MXFP4 grid): transformers loads the same model."""
    dense, back = tmp_path / "dense", tmp_path / "back"
    r = cli("-q", "export", oss["mxfp4-src"], "--format", "safetensors", "-o", dense)
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert not any(k.endswith(("_blocks", "_scales")) for k in _experts(dense))
    r = cli("-q", "quantize", dense, "--format", "mxfp4", "-o", back)
    assert r.exit_code == 0, r.stderr
    want = dict(hf_model(oss["mxfp4-src"]).named_parameters())
    for folder in (dense, back):
        got = dict(hf_model(folder).named_parameters())
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (folder.name, k)
