"""The layer runner on MoE checkpoints: per-expert blocks compute what transformers' fused blocks
compute, and the weight loader reads a checkpoint both as transformers stores it on disk (one
tensor per expert) and as it builds it in memory (fused 3-D experts), through transformers' own
conversion mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.moe.helpers import MOE_ARCHS, build_tiny_moe, moe_layer


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("moe-runner")
    return {a: build_tiny_moe(d / a, a, assets.smollm2_hf) for a in MOE_ARCHS}


def _fused_state_dict(model: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return {n: p.detach() for n, p in hf.named_parameters()}, hf


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_per_expert_block_matches_transformers(models, arch: str) -> None:
    from qtool.runner.moe import take_routed

    _, layer, block = moe_layer(models[arch])
    names = {n for n, _ in layer.named_parameters()}
    disk = (
        "block_sparse_moe.experts.3.w1.weight"
        if arch == "mixtral"
        else "mlp.experts.3.gate_proj.weight"
    )
    assert disk in names  # the checkpoint's own names
    _, hf = _fused_state_dict(models[arch])
    ref_block = hf.model.layers[1].mlp
    x = torch.randn(2, 24, 256)
    with torch.no_grad():
        ref = ref_block(x)
        got = block(x)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
        routed = take_routed(layer)
        assert routed is not None and sum(routed) == 2 * 24 * 2  # top-2 of 48 tokens
        block.all_experts = True  # every expert sees every token; the output is the same
        assert torch.allclose(block(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_loader_reads_fused_and_per_expert_layouts(models, tmp_path: Path, arch: str) -> None:
    """transformers' own skeleton (fused experts) loads from the per-expert checkpoint, and the
    per-expert skeleton loads from a checkpoint saved with fused experts."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtool.checkpoint import open_checkpoint
    from qtool.runner.layers import WeightLoader, _parts, build_skeleton, params_on_meta

    ref, _ = _fused_state_dict(models[arch])
    ckpt = open_checkpoint(str(models[arch]))
    with params_on_meta():
        fused = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models[arch]))
    layer = _parts(fused).layers[0]
    WeightLoader(ckpt, torch.device("cpu"), torch.float32).load(layer, "model.layers.0.")
    got = dict(layer.named_parameters())
    assert "mlp.experts.gate_up_proj" in got
    for n, p in got.items():
        assert torch.equal(p, ref[f"model.layers.0.{n}"]), n

    # a checkpoint whose experts are stored fused (the in-memory layout), read per expert
    fdir = tmp_path / "fused"
    fdir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (fdir / f).write_bytes((models[arch] / f).read_bytes())
    save_file(
        {n: t.to(torch.bfloat16).contiguous() for n, t in ref.items()}, fdir / "model.safetensors"
    )
    fck = open_checkpoint(str(fdir))
    skel = build_skeleton(fck, torch.float32)
    per = _parts(skel).layers[0]
    WeightLoader(fck, torch.device("cpu"), torch.float32).load(per, "model.layers.0.")
    pe = dict(per.named_parameters())
    g, u, d = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    blk = "block_sparse_moe" if arch == "mixtral" else "mlp"
    gate_up, down = (
        ref["model.layers.0.mlp.experts.gate_up_proj"],
        ref["model.layers.0.mlp.experts.down_proj"],
    )
    f = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        assert torch.equal(pe[f"{blk}.experts.{e}.{g}.weight"], gate_up[e, :f])
        assert torch.equal(pe[f"{blk}.experts.{e}.{u}.weight"], gate_up[e, f:])
        assert torch.equal(pe[f"{blk}.experts.{e}.{d}.weight"], down[e])
