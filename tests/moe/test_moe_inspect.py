"""``qtool inspect`` on real-size MoE configs: Mixtral-8x7B and Qwen3-30B-A3B as published
(config.json values), with a sparse safetensors file (the header written, the data a hole left
by truncate), so the report comes from headers alone as it does for the real checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.moe.helpers import sparse_safetensors

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors as the released safetensors name them (one per expert)."""
    h, v, n_exp = (
        cfg["hidden_size"],
        cfg["vocab_size"],
        cfg.get("num_local_experts") or cfg["num_experts"],
    )
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    mixtral = cfg["model_type"] == "mixtral"
    ff = cfg["intermediate_size"] if mixtral else cfg["moe_intermediate_size"]
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if not mixtral:
            out |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        block, (g, u, d) = (
            ("block_sparse_moe", ("w1", "w3", "w2"))
            if mixtral
            else (
                "mlp",
                ("gate_proj", "up_proj", "down_proj"),
            )
        )
        out[p + f"{block}.gate.weight"] = (n_exp, h)
        for e in range(n_exp):
            ep = p + f"{block}.experts.{e}."
            out |= {
                ep + f"{g}.weight": (ff, h),
                ep + f"{u}.weight": (ff, h),
                ep + f"{d}.weight": (h, ff),
            }
    return out


def sparse_checkpoint(path: Path, cfg: dict) -> dict[str, tuple[int, ...]]:
    """config.json and a bf16 model.safetensors whose data is a hole (header only on disk)."""
    sh = shapes(cfg)
    sparse_safetensors(path, cfg, {n: ("BF16", s) for n, s in sh.items()})
    return sh


def counts(cfg: dict) -> tuple[int, int]:
    """Total and active parameters from the config alone: every tensor, minus the routed experts
    but ``top_k`` of them per layer."""
    sh = shapes(cfg)
    numel = {n: eval("*".join(map(str, s))) for n, s in sh.items()}  # noqa: S307 - integers
    experts = sum(v for n, v in numel.items() if ".experts." in n)
    n_exp = cfg.get("num_local_experts") or cfg["num_experts"]
    total = sum(numel.values())
    return total, total - experts + cfg["num_experts_per_tok"] * experts // n_exp


@pytest.mark.parametrize(
    "cfg,total,active,label",
    [
        (MIXTRAL_8X7B, 46_702_792_704, 12_879_925_248, (46.7, 12.9)),
        (QWEN3_30B_A3B, 30_532_122_624, 3_353_032_704, (30.5, 3.3)),
    ],
    ids=["mixtral-8x7b", "qwen3-30b-a3b"],
)
def test_inspect_real_moe_configs(cli, tmp_path: Path, cfg, total, active, label) -> None:
    model = tmp_path / cfg["model_type"]
    sparse_checkpoint(model, cfg)
    assert (model / "model.safetensors").stat().st_blocks * 512 < 16 * 2**20  # header only
    assert counts(cfg) == (total, active)
    r = cli("inspect", model, "--json")
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["params"]["total"] == total
    moe = d["params"]["moe"]
    assert moe["active"] == active
    # the published figures (Mistral: 46.7B / 12.9B; Qwen: 30.5B / 3.3B activated)
    assert abs(total / 1e9 - label[0]) < 0.06 and abs(active / 1e9 - label[1]) < 0.06
    assert moe["top_k"] == cfg["num_experts_per_tok"]
    fmts = {f["format"]: f for f in d["formats"]}
    assert fmts["BF16"]["bytes"] == 2 * total
    assert fmts["BF16"]["expert_bytes"] == 2 * moe["experts"]
    # llama-quantize's Q4_K_M on these shapes: experts are the bulk, in 4.5-6.6 bits
    q4 = fmts["Q4_K_M"]
    assert 0.8 * q4["bytes"] < q4["expert_bytes"] < q4["bytes"]
    assert 4.5 < q4["bits_per_weight"] < 5.2
    assert q4["types"]["F32"] >= cfg["num_hidden_layers"]  # routers and norms stay F32
    text = cli("inspect", model)
    assert text.exit_code == 0
    assert "active" in text.stdout and f"{active:,}" in text.stdout, text.stdout
