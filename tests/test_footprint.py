"""The inspect report against independent truths: transformers' own parameter count and KV
cache, the files on disk, and llama.cpp's block tables (written out here from ggml-common.h)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama

# Bytes per block / weights per block, as ../shared/DESIGN.md lists them from ggml-common.h.
BLOCK = {
    "Q8_0": (34, 32),
    "Q4_0": (18, 32),
    "Q4_1": (20, 32),
    "Q5_0": (22, 32),
    "Q5_1": (24, 32),
    "Q2_K": (84, 256),
    "Q3_K": (110, 256),
    "Q4_K": (144, 256),
    "Q5_K": (176, 256),
    "Q6_K": (210, 256),
    "TQ2_0": (66, 256),
    "F32": (4, 1),
    "F16": (2, 1),
}


def nbytes(numel: int, t: str) -> int:
    b, n = BLOCK[t]
    assert numel % n == 0
    return numel // n * b


def formats(report: dict) -> dict[str, dict]:
    return {f["format"]: f for f in report["formats"]}


def test_param_count_matches_transformers(cli, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    r = cli("inspect", tiny_llama, "--json")
    assert r.exit_code == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert r.json()["params"]["total"] == model.num_parameters()


def test_smollm2_acceptance(cli, assets) -> None:
    """Issue acceptance: params == num_parameters(); --context 4096 KV bytes == a real cache."""
    import torch
    from transformers import AutoModelForCausalLM

    r = cli("inspect", assets.smollm2_hf, "--context", "4096", "--json")
    assert r.exit_code == 0, r.stderr
    rep = r.json()
    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_hf, dtype=torch.bfloat16)
    assert rep["params"]["total"] == model.num_parameters() == 134515008
    with torch.no_grad():
        out = model(torch.randint(0, 49152, (1, 4096)), use_cache=True)
    cache = out.past_key_values
    real = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert rep["runtime"]["cache_dtype"] == "bfloat16"
    assert rep["runtime"]["kv_cache"] == real


@pytest.mark.parametrize("dtype,cache_dtype", [("float32", None), ("bfloat16", "fp32")])
def test_kv_cache_matches_real_forward(cli, tmp_path: Path, dtype: str, cache_dtype) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "m", dtype=dtype)
    args = ["inspect", path, "--context", "300", "--batch", "3", "--json"]
    if cache_dtype:
        args += ["--cache-dtype", cache_dtype]
    rep = cli(*args).json()
    run_dtype = torch.float32  # the cache dtype asked for is fp32 in both cases
    model = AutoModelForCausalLM.from_pretrained(path, dtype=run_dtype)
    with torch.no_grad():
        cache = model(torch.randint(0, 1024, (3, 300)), use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    assert rep["runtime"]["kv_cache"] == real


def test_bytes_on_disk_match_files(cli, tiny_llama: Path) -> None:
    rep = cli("inspect", tiny_llama, "--json").json()
    assert rep["model"]["bytes_on_disk"] == sum(
        p.stat().st_size for p in tiny_llama.glob("*.safetensors")
    )


def test_gguf_sizes_follow_block_tables_and_mixes(cli, tiny_llama: Path) -> None:
    """Tiny Llama (2 layers, 256-multiple rows): every tensor's type written out by hand from
    llama.cpp's rules, every size from the block table."""
    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    numel = {k: int(__import__("math").prod(s)) for k, s in shapes.items()}
    n_params = sum(numel.values())
    rep = formats(cli("inspect", tiny_llama, "--json").json())

    def expect(rule) -> int:
        return sum(nbytes(numel[k], "F32" if len(shapes[k]) == 1 else rule(k)) for k in numel)

    # Q8_0: everything 2-D in Q8_0 (output too: the preset is Q8_0).
    assert rep["Q8_0"]["bytes"] == expect(lambda k: "Q8_0")

    # Q4_K_M with n_layer = 2: more_bits(1, 2) holds (i >= 7n/8), more_bits(0, 2) does not;
    # output -> Q6_K; untied token embeddings keep Q4_K.
    def q4km(k: str) -> str:
        if k == "lm_head.weight":
            return "Q6_K"
        if k.startswith("model.layers.1.") and ("v_proj" in k or "down_proj" in k):
            return "Q6_K"
        return "Q4_K"

    assert rep["Q4_K_M"]["bytes"] == expect(q4km)
    assert rep["Q4_K_M"]["bits_per_weight"] == pytest.approx(8 * expect(q4km) / n_params)

    # Q2_K: attn_v -> Q3_K (gqa 2 < 4), ffn_down and attn_output -> Q3_K, output -> Q6_K.
    def q2k(k: str) -> str:
        if k == "lm_head.weight":
            return "Q6_K"
        if any(s in k for s in ("v_proj", "down_proj", "o_proj")):
            return "Q3_K"
        return "Q2_K"

    assert rep["Q2_K"]["bytes"] == expect(q2k)
    # TQ2_0: token embeddings Q4_K, output Q6_K.
    tq = {"model.embed_tokens.weight": "Q4_K", "lm_head.weight": "Q6_K"}
    assert rep["TQ2_0"]["bytes"] == expect(lambda k: tq.get(k, "TQ2_0"))


def test_row_fallbacks_on_smollm2(cli, assets) -> None:
    """SmolLM2's rows of 576 do not divide into 256: llama.cpp falls back Q4_K -> Q5_0,
    Q6_K -> Q8_0, and the tied embeddings (output rule) go to Q8_0."""
    rep = formats(cli("inspect", assets.smollm2_hf, "--json").json())
    q4 = rep["Q4_K_M"]["types"]
    # 30 layers: attn q/k/v/o, gate, up (576 cols) fall back; ffn_down has 1536 cols.
    assert q4["Q8_0"] == 1 + 14  # token_embd + the 14 more_bits attn_v (Q6_K -> Q8_0)
    assert q4["Q5_0"] == 30 * 6 - 14  # other 576-col matrices
    assert q4["Q6_K"] == 14 and q4["Q4_K"] == 16  # ffn_down: more_bits layers / others
    assert q4["F32"] == 61


def test_gptq_bytes_count_scales_zeros_and_gidx(cli, tiny_llama: Path) -> None:
    rep = formats(cli("inspect", tiny_llama, "--json").json())
    from safetensors import safe_open

    total = 0
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as f:
        for k in f.keys():
            shape = tuple(f.get_slice(k).get_shape())
            if k.startswith("model.layers.") and len(shape) == 2:
                out_f, in_f = shape  # qweight + qzeros + scales + g_idx (GPTQ v1 layout)
                total += in_f // 8 * out_f * 4 + in_f // 128 * out_f // 8 * 4
                total += in_f // 128 * out_f * 2 + in_f * 4
            else:
                total += 2 * __import__("math").prod(shape)
    assert rep["GPTQ 4-bit g128"]["bytes"] == total


def test_json_report_written_atomically(cli, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    r = cli("inspect", tiny_llama, "-o", out, "--json")
    assert r.exit_code == 0
    assert json.loads(out.read_text()) == r.json()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.slow
def test_gemma3_sliding_window_kv_cache(cli, assets) -> None:
    """Gemma 3: 5 of 6 layers attend a 512-token window; the report matches a real cache."""
    import torch
    from transformers import AutoModelForCausalLM

    assert assets.gemma3_hf is not None, "run with QTOOL_TEST_GEMMA=1 (make test-slow)"
    rep = cli("inspect", assets.gemma3_hf, "--context", "1024", "--json").json()
    model = AutoModelForCausalLM.from_pretrained(assets.gemma3_hf, dtype=torch.bfloat16)
    assert rep["params"]["total"] == model.num_parameters()
    with torch.no_grad():
        cache = model(torch.randint(0, 1000, (1, 1024)), use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    assert rep["runtime"]["kv_cache"] == real
