"""gpt-oss in the layer runner: the per-expert block (one biased ``nn.Linear`` per expert
projection, read out of the fused float or MXFP4 tensors) computes what transformers' fused
block computes; calibration counts routed tokens and writes a per-expert imatrix in
llama-imatrix's layout; GPTQ per expert, starved experts rounded to nearest with a warning, and
the GGUF runs in llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.export.helpers import llama_logits
from tests.moe.helpers import build_tiny_gpt_oss, moe_layer

DATA = ("-d", "canterbury", "-n", "2", "-L", "16", "--device", "cpu")  # 32 tokens, 4 experts
TP = ("--tokenizer-pre", "smollm")


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gpt-oss-runner")
    return {
        layout: build_tiny_gpt_oss(d / layout, assets.smollm2_hf, mxfp4=layout == "mxfp4")
        for layout in ("float", "mxfp4")
    }


@pytest.mark.parametrize("layout", ["float", "mxfp4"])
def test_per_expert_block_matches_transformers(models, layout: str) -> None:
    from transformers import AutoModelForCausalLM

    from qtool.runner.moe import take_routed

    _, layer, block = moe_layer(models[layout])
    names = {n for n, _ in layer.named_parameters()}
    assert {"mlp.router.bias", "mlp.experts.3.up_proj.weight", "mlp.experts.3.down_proj.bias"} <= (
        names
    )
    hf = AutoModelForCausalLM.from_pretrained(models[layout], dtype=torch.float32)
    ref_block = hf.model.layers[1].mlp
    ref_experts = ref_block.experts
    for e in range(4):  # the weights themselves: de-interleaved, transposed, decoded exactly
        fused = ref_experts.gate_up_proj[e].detach()  # [H, 2F]
        assert torch.equal(block.experts[e].gate_proj.weight, fused[:, 0::2].T)
        assert torch.equal(block.experts[e].up_proj.weight, fused[:, 1::2].T)
        assert torch.equal(block.experts[e].down_proj.weight, ref_experts.down_proj[e].detach().T)
        assert torch.equal(
            block.experts[e].up_proj.bias, ref_experts.gate_up_proj_bias[e].detach()[1::2]
        )
    x = torch.randn(2, 24, 256) * 2
    with torch.no_grad():
        ref, ref_scores = ref_block(x)
        got, scores = block(x)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
        routed = take_routed(layer)
        assert routed is not None and sum(routed) == 2 * 24 * 2  # top-2 of 48 tokens
        block.all_experts = True  # every expert sees every token; the output is the same
        assert torch.allclose(block(x)[0], ref, atol=1e-4, rtol=1e-4)


def test_calibrate_router_stats_and_imatrix(cli, models, tmp_path: Path) -> None:
    from qtool.calibrate.imatrix import load_imatrix

    im = tmp_path / "im.gguf"
    r = cli("calibrate", models["mxfp4"], *DATA, "-o", tmp_path / "s.safetensors",
            "--imatrix", im, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    d = r.json()["experts"]
    assert d["n_expert"] == 4 and d["top_k"] == 2 and len(d["layers"]) == 2
    entries = load_imatrix(im).entries
    for role in ("gate", "up", "down"):
        e = entries[f"blk.0.ffn_{role}_exps.weight"]
        assert e.sums.shape == (4, 256) and e.counts.shape == (4,)
        assert e.counts.sum() == 2 * 32  # each token counted in its 2 experts
    assert "blk.1.attn_q.weight" in entries
    r = cli("calibrate", models["mxfp4"], *DATA, "-o", tmp_path / "s2.safetensors",
            "--imatrix", im, "--all-experts")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert (load_imatrix(im).entries["blk.1.ffn_gate_exps.weight"].counts == 32).all()


# the MXFP4 checkpoint differs only in how the experts are read (test_per_expert_block_...)
# both layouts in `make test-slow`: per-expert GPTQ of gpt-oss stays in the default suite through
# test_gptq_mxfp4_moe and tests/moe/test_gpt_oss_mxfp4.py, the starved-expert fallback through
# tests/moe/test_moe_calibrate_gptq.py
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["float", "mxfp4"])
def test_gptq_per_expert(cli, models, tmp_path: Path, layout: str) -> None:
    """GPTQ (Q4_K_M grids) per expert; 32 tokens x top-2 over 4 experts leaves some with fewer
    than 32, rounded to nearest with a warning; with --all-experts every expert is GPTQ'd and
    its error on its Hessian is no worse than RTN's."""
    out = tmp_path / "gptq.gguf"
    r = cli("quantize", models[layout], "--method", "gptq", "--type", "Q4_K_M", *DATA, "-o", out,
            *TP, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    experts = [x for x in r.json()["layers"] if ".experts." in x["name"]]
    assert len(experts) == 2 * 4 * 3
    if any(x["method"] == "rtn" for x in experts):
        assert "rounded to nearest (RTN) instead of GPTQ" in r.stderr
    assert np.isfinite(llama_logits(out, [5, 6, 7, 8, 9, 10])).all()
    full = tmp_path / "gptq-all.gguf"
    r = cli("quantize", models[layout], "--method", "gptq", "--type", "Q4_K_M", *DATA, "-o",
            full, *TP, "--all-experts", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    experts = [x for x in r.json()["layers"] if ".experts." in x["name"]]
    assert all(x["method"] == "gptq" and x["tokens"] == 32 for x in experts)
    assert all(x["gptq_rel_error"] <= x["rtn_rel_error"] * 1.05 for x in experts)
    assert np.isfinite(llama_logits(full, [5, 6, 7, 8, 9, 10])).all()


def test_gptq_mxfp4_moe(cli, models, tmp_path: Path) -> None:
    """MXFP4_MOE with GPTQ: the experts on MXFP4's table grid (every expert given every token),
    the other linears on Q8_0; the file has llama-quantize's types and runs in llama.cpp."""
    from gguf import GGUFReader

    out = tmp_path / "mx.gguf"
    r = cli("quantize", models["float"], "--method", "gptq", "--type", "MXFP4_MOE", *DATA,
            "-o", out, *TP, "--all-experts", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    experts = [x for x in r.json()["layers"] if ".experts." in x["name"]]
    assert len(experts) == 2 * 4 * 3 and all(x["method"] == "gptq" for x in experts)
    assert all(x["gptq_rel_error"] <= x["rtn_rel_error"] * 1.05 for x in experts)
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert {kinds[n] for n in kinds if "_exps.weight" in n} == {"MXFP4"}
    assert np.isfinite(llama_logits(out, [5, 6, 7, 8, 9, 10])).all()
