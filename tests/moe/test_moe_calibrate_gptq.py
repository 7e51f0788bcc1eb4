"""Calibration and GPTQ on a tiny Qwen3-MoE with too little data: the router statistics and the
coverage table, starved experts rounded to nearest with a warning naming them, every expert a
Hessian with --all-experts, a per-expert imatrix in llama-imatrix's layout, and GGUF files
llama.cpp runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.export.helpers import llama_logits
from tests.moe.helpers import build_tiny_moe

DATA = ("-d", "canterbury", "-n", "2", "-L", "16", "--device", "cpu")  # 32 tokens, 8 experts


@pytest.fixture(scope="module")
def qwen3_moe(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_moe(
        tmp_path_factory.mktemp("moe-gptq") / "m", "qwen3_moe", assets.smollm2_hf, experts=8
    )


def test_calibrate_router_stats_and_imatrix(cli, qwen3_moe: Path, tmp_path: Path) -> None:
    from qtool.calibrate.imatrix import load_imatrix

    im = tmp_path / "im.gguf"
    r = cli(
        "calibrate", qwen3_moe, *DATA, "-o", tmp_path / "s.safetensors", "--imatrix", im, "--json"
    )
    assert r.exit_code == 0, r.stderr
    d = r.json()["experts"]
    assert d["n_expert"] == 8 and d["top_k"] == 2 and len(d["layers"]) == 2
    assert any(row["starved"] for row in d["layers"])  # 64 routings over 8 experts
    assert "experts saw fewer than" in r.stderr
    table = cli("calibrate", qwen3_moe, *DATA, "-o", tmp_path / "s2.safetensors")
    assert "Expert coverage" in table.stdout
    e = load_imatrix(im).entries["blk.0.ffn_down_exps.weight"]
    assert e.sums.shape == (8, 256) and e.counts.shape == (8,)
    assert e.counts.sum() == 2 * 32  # each token counted in its 2 experts
    r = cli(
        "calibrate",
        qwen3_moe,
        *DATA,
        "-o",
        tmp_path / "s3.safetensors",
        "--imatrix",
        im,
        "--all-experts",
    )
    assert r.exit_code == 0, r.stderr
    e = load_imatrix(im).entries["blk.1.ffn_gate_exps.weight"]
    assert (e.counts == 32).all()  # every expert saw every token


def test_gptq_starved_experts_fall_back_to_rtn(cli, qwen3_moe: Path, tmp_path: Path) -> None:
    out = tmp_path / "gptq.gguf"
    r = cli("quantize", qwen3_moe, "--method", "gptq", "--type", "Q4_K_M", *DATA, "-o", out,
            "--tokenizer-pre", "smollm", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "rounded to nearest (RTN) instead of GPTQ" in r.stderr
    assert "experts: tokens routed" in r.stderr and "starved" in r.stderr
    logits = llama_logits(out, [5, 6, 7, 8, 9, 10])
    assert np.isfinite(logits).all()

    full = tmp_path / "gptq-all.gguf"
    r = cli("quantize", qwen3_moe, "--method", "gptq", "--type", "Q4_K_M", *DATA, "-o", full,
            "--tokenizer-pre", "smollm", "--all-experts", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "instead of GPTQ" not in r.stderr
    experts = [x for x in r.json()["layers"] if ".experts." in x["name"]]
    assert len(experts) == 2 * 8 * 3
    assert all(x["method"] == "gptq" and x["tokens"] == 32 for x in experts)
    assert all(x["gptq_rel_error"] <= x["rtn_rel_error"] * 1.05 for x in experts)
    assert np.isfinite(llama_logits(full, [5, 6, 7, 8, 9, 10])).all()


def test_compressed_tensors_output_loads_in_transformers(
    cli, qwen3_moe: Path, tmp_path: Path
) -> None:
    """Per-expert int4 weights (the checkpoint's names) that transformers loads and fuses."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w4"
    r = cli("-q", "quantize", qwen3_moe, "--method", "rtn", "--bits", "4", "-g", "64",
            "--format", "compressed-tensors", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert any("gate" in i for i in cfg.get("ignore", []))  # routers stay float
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() < 0.25  # 4-bit g64 on random weights
