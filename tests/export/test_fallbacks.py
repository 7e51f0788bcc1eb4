"""llama.cpp's row-length fallbacks for every preset, on a tiny model whose rows do not divide
into 256: qtool's file against ``llama_model_quantize`` (llama-quantize) applied to qtool's F32
GGUF of the same checkpoint; every tensor must get the same type and the same bytes.

The model (a 2-layer Llama, 1024-token vocabulary) has rows of three lengths:
- 320 (hidden: token_embd, output, attn_q/k/v, ffn_gate/up): 320 % 256 = 64, 320 % 32 = 0, so
  Q2_K/Q3_K/TQ* -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0;
- 960 (intermediate: ffn_down): the same fallbacks (960 % 256 = 192);
- 80 (5 heads x head_dim 16: attn_output): 80 % 32 = 16, so every quantized type, the 32-block
  fallbacks and Q4_0 ... Q8_0 themselves, becomes F16 (llama-quant.cpp tensor_type_fallback).
One KV head (GQA 5) makes Q2_K's attn_v Q4_K (-> Q5_0) rather than Q3_K.

The preset list is written out (qtool's preset table minus F32) so that the test does not take
it from qtool; ``FALLBACK_OF`` (what llama.cpp's own file holds for a 320-wide and the 80-wide
row under each preset) checks that the model really exercises the fallbacks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.helpers import build_tiny, compare_files, gguf_tensors, llama_quantize

TP = ("--tokenizer-pre", "smollm")  # the tiny model's cut tokenizer (see small_tokenizer)

PRESETS = [
    "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "TQ1_0", "TQ2_0",
]  # fmt: skip

# preset -> (type of blk.0.attn_q.weight [row 320], of blk.0.attn_output.weight [row 80])
FALLBACK_OF = {
    "F16": ("F16", "F16"),
    "BF16": ("BF16", "BF16"),
    "Q4_0": ("Q4_0", "F16"),
    "Q4_1": ("Q4_1", "F16"),
    "Q8_0": ("Q8_0", "F16"),
    "Q5_0": ("Q5_0", "F16"),
    "Q5_1": ("Q5_1", "F16"),
    "Q2_K": ("Q4_0", "F16"),  # Q2_K -> Q4_0; attn_output Q3_K -> Q4_0 -> F16
    "Q3_K_S": ("Q4_0", "F16"),
    "Q3_K_M": ("Q4_0", "F16"),
    "Q3_K_L": ("Q4_0", "F16"),
    "Q4_K_S": ("Q5_0", "F16"),
    "Q4_K_M": ("Q5_0", "F16"),
    "Q5_K_S": ("Q5_1", "F16"),
    "Q5_K_M": ("Q5_1", "F16"),
    "Q6_K": ("Q8_0", "F16"),
    "TQ1_0": ("Q4_0", "F16"),
    "TQ2_0": ("Q4_0", "F16"),
}
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "TQ1_0", "TQ2_0"}  # 256-blocks


@pytest.fixture(scope="module")
def odd(assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The odd-width model and qtool's F32 GGUF of it."""
    from qtool.cli.app import main

    d = tmp_path_factory.mktemp("fallbacks")
    model = build_tiny(
        d / "model",
        "llama",
        assets.smollm2_hf,
        hidden_size=320,
        intermediate_size=960,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=16,
    )
    f32 = d / "model-f32.gguf"
    with pytest.raises(SystemExit) as e:
        main(["-q", "export", str(model), "--outtype", "F32", "-o", str(f32), *TP])
    assert e.value.code == 0
    return model, f32


def test_preset_list_is_complete() -> None:
    assert set(PRESETS) == set(FALLBACK_OF) and len(PRESETS) == len(set(PRESETS))


@pytest.mark.parametrize("preset", PRESETS)
def test_fallbacks_match_llama_quantize(cli, odd, tmp_path: Path, preset: str) -> None:
    model, f32 = odd
    ref, mine = tmp_path / "ref.gguf", tmp_path / "mine.gguf"
    llama_quantize(f32, ref, preset)
    r = cli("-q", "quantize", model, "--method", "kquant", "--type", preset, "-o", mine, *TP)
    assert r.exit_code == 0, r.stderr
    types, data = compare_files(ref, mine)
    assert not types, types
    assert not data, f"{len(data)} tensors differ in bytes: {data[:5]}"
    # llama.cpp's own file shows the fallbacks this model is built to exercise
    ref_types = {n: t for n, (t, _) in gguf_tensors(ref).items()}
    assert (ref_types["blk.0.attn_q.weight"], ref_types["blk.0.attn_output.weight"]) == (
        FALLBACK_OF[preset]
    )
    assert not K_TYPES & set(ref_types.values()), sorted(set(ref_types.values()))
