"""``qtool inspect`` on the released gpt-oss checkpoints, without their weights.

The published ``config.json`` (``tests/models/configs/gpt-oss-{20b,120b}.json``) and one
safetensors file laid out as OpenAI's release is: MXFP4 experts as ``*_blocks`` uint8
``[E, rows, cols/32, 16]`` and ``*_scales`` uint8 ``[E, rows, cols/32]``, per-expert biases,
attention sinks, everything else bf16; its data a hole (the header written, the file truncated to
full size). The counts must be OpenAI's published ones (model card / paper: gpt-oss-20b 20.91B
total, 3.61B active; gpt-oss-120b 116.83B total, 5.13B active). Those totals count every bias
and sink and two parameters per packed byte, no scales; the active figures count the output
head but not the token-embedding table (a token reads one row of it), which is qtool's
``active_excl_embedding``; ``active`` counts the table too, as Mixtral's and Qwen's figures do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.moe.helpers import sparse_safetensors

CONFIGS = Path(__file__).parents[1] / "models" / "configs"


def released_shapes(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of the released checkpoint's tensors, from the config alone."""
    h, v, e = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"]
    f, hd = cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {
        "model.embed_tokens.weight": ("BF16", (v, h)),
        "lm_head.weight": ("BF16", (v, h)),
        "model.norm.weight": ("BF16", (h,)),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, (rows, cols) in {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}.items():
            out[p + f"self_attn.{proj}_proj.weight"] = ("BF16", (rows, cols))
            out[p + f"self_attn.{proj}_proj.bias"] = ("BF16", (rows,))
        out[p + "self_attn.sinks"] = ("BF16", (cfg["num_attention_heads"],))
        out[p + "input_layernorm.weight"] = ("BF16", (h,))
        out[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        out[p + "mlp.router.weight"] = ("BF16", (e, h))
        out[p + "mlp.router.bias"] = ("BF16", (e,))
        for proj, (rows, cols) in {"gate_up_proj": (2 * f, h), "down_proj": (h, f)}.items():
            x = p + f"mlp.experts.{proj}"
            out[x + "_blocks"] = ("U8", (e, rows, cols // 32, 16))
            out[x + "_scales"] = ("U8", (e, rows, cols // 32))
            out[x + "_bias"] = ("BF16", (e, rows))
    return out


def sparse_release(path: Path, name: str) -> dict:
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    sparse_safetensors(path, cfg, released_shapes(cfg))
    return cfg


def expected(cfg: dict) -> dict[str, int]:
    """Parameter counts from the config by hand (every weight, bias and sink)."""
    h, v, e, k = (cfg[x] for x in ("hidden_size", "vocab_size", "num_local_experts",
                                  "num_experts_per_tok"))  # fmt: skip
    f, hd, nh, nkv = (cfg[x] for x in ("intermediate_size", "head_dim", "num_attention_heads",
                                      "num_key_value_heads"))  # fmt: skip
    attn = (h * nh * hd + nh * hd) + 2 * (h * nkv * hd + nkv * hd) + (nh * hd * h + h) + nh
    dense_layer = attn + 2 * h + (e * h + e)
    expert = (h * 2 * f + 2 * f) + (f * h + h)  # one expert: weights and biases
    n = cfg["num_hidden_layers"]
    total = n * (dense_layer + e * expert) + 2 * v * h + h
    active = total - n * (e - k) * expert
    return {"total": total, "experts": n * e * expert, "active": active,
            "active_excl_embedding": active - v * h}  # fmt: skip


@pytest.mark.parametrize(
    "name,published",
    [("gpt-oss-20b", (20.91, 3.61)), ("gpt-oss-120b", (116.83, 5.13))],
)
def test_inspect_released_gpt_oss(cli, tmp_path: Path, name: str, published) -> None:
    model = tmp_path / name
    cfg = sparse_release(model, name)
    assert (model / "model.safetensors").stat().st_blocks * 512 < 16 * 2**20  # header only
    want = expected(cfg)
    r = cli("inspect", model, "--json")
    assert r.exit_code == 0, r.stderr
    d = r.json()
    moe = d["params"]["moe"]
    assert d["params"]["total"] == want["total"]
    assert moe["experts"] == want["experts"]
    assert moe["active"] == want["active"]
    assert moe["active_excl_embedding"] == want["active_excl_embedding"]
    assert (moe["n_expert"], moe["top_k"]) == (cfg["num_local_experts"], 4)
    # OpenAI's figures, to their two decimals
    assert round(want["total"] / 1e9, 2) == published[0]
    assert round(want["active_excl_embedding"] / 1e9, 2) == published[1]
    # packed MXFP4 bytes hold two parameters each; the scales hold none
    packed = sum(
        2 * s[0] * s[1] * s[2] * s[3]
        for n, (dt, s) in released_shapes(cfg).items()
        if n.endswith("_blocks")
    )
    assert d["params"]["by_dtype"]["U8 packed"] == packed
    assert sum(d["params"]["by_dtype"].values()) == want["total"]
    fmts = {f["format"]: f for f in d["formats"]}
    assert fmts["BF16"]["bytes"] == 2 * want["total"]
    assert fmts["BF16"]["expert_bytes"] == 2 * want["experts"]
    # MXFP4_MOE: experts in 17 bytes per 32 weights (+ F32 expert biases), the rest Q8_0/F32
    mx = fmts["MXFP4_MOE"]
    per_layer = cfg["num_local_experts"] * (2 * cfg["intermediate_size"] + cfg["hidden_size"])
    e_bias = cfg["num_hidden_layers"] * per_layer
    assert mx["expert_bytes"] == (want["experts"] - e_bias) // 32 * 17 + 4 * e_bias
    assert mx["types"]["MXFP4"] == 3 * cfg["num_hidden_layers"]
    assert set(mx["types"]) == {"MXFP4", "Q8_0", "F32"}
    # rows of 2880 do not divide into 256-blocks: Q4_K_M falls back as llama.cpp does
    assert "Q5_0" in fmts["Q4_K_M"]["types"] or "Q8_0" in fmts["Q4_K_M"]["types"]
    text = cli("inspect", model)
    assert text.exit_code == 0
    assert f"{want['active']:,}" in text.stdout
    assert f"{published[1]:.2f}B" in text.stdout  # active without the token embeddings


@pytest.mark.parametrize("preset", ["MXFP4_MOE", "Q4_K_M", "Q8_0"])
def test_real_size_plan_matches_llama_quantize(cli, tmp_path: Path, preset: str) -> None:
    """gpt-oss-20b at full size: every tensor of ``quantize --dry-run`` gets the type
    llama-quantize gives it (``llama_model_quantize`` dry run on the file qtool's F16 export
    would write: MXFP4 experts; rows of 2880 fall back from Q4_K to Q5_0 / Q6_K to Q8_0)."""
    from tests.export.helpers import llama_quantize_types
    from tests.models.test_real_configs import sparse_gguf

    folder = tmp_path / "gpt-oss-20b"
    sparse_release(folder, "gpt-oss-20b")
    f16 = sparse_gguf(folder, tmp_path / "f16.gguf")
    r = cli("quantize", folder, "--type", preset, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    plan = {t["name"]: t["grid"] for t in r.json()["outputs"][0]["tensors"]}
    assert len(plan) == 3 + 24 * 19  # 459 tensors, as the published GGUF files have
    assert plan == llama_quantize_types(f16, preset)
