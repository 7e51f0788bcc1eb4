"""Quantized GGUFs of every supported architecture, run by llama.cpp, against transformers on the
same dequantized weights.

``qtool quantize --method kquant`` writes Q4_K_M and Q8_0 files of tiny random models
(helpers.build_tiny); llama.cpp (llama-cpp-python) computes their logits. The reference is
transformers running the HF model with every weight replaced by the GGUF tensor as gguf-py
decodes it (``gguf.quants.dequantize``), names mapped with gguf-py's ``TensorNameMap`` and
llama.cpp's converter layout undone here: Llama's Q/K rows permuted back (the inverse of
convert_hf_to_gguf.py's ``LlamaModel.permute``), Gemma's norms stored as ``w + 1`` minus 1.

The models' query and key projections are scaled by 4 (exactly, in bf16) after building, so
that attention is far from uniform and the logits depend on the attention path (RoPE layout,
head counts, sliding window), which a random model with small weights barely shows.

Tolerance. Both sides hold the same weights, but llama.cpp's CPU backend quantizes the
activations of every quantized matmul to 8 bits (ggml-cpu ``vec_dot_type``: Q8_0 for Q8_0, Q8_K
for the k-quants) and keeps an F16 KV cache, so the logits differ by about as much as 8-bit
weights would move them. Measured (64 random tokens, |logits| up to ~2), relative RMS error of
llama.cpp against the dequantized reference, Q4_K_M / Q8_0: llama 0.025 / 0.018, qwen2
0.008 / 0.007, qwen3 0.018 / 0.013, gemma3 0.032 / 0.023, phi3 0.028 / 0.019; max |Δ| up to
4.2% of max |logit| (phi3 Q4_K_M). Bounds: relative RMS 0.06 and max |Δ| 0.08 x max |logit|
(about twice the worst case). Argmax: the logits of a random model are near-uniform, so a few
positions are near-ties; every top-1 flip must be at a reference top-2 margin below the max
|Δ| of that run, and at least 80% must agree (measured >= 89%).

This comparison holds for any weights in the file, so it cannot see a wrong export layout
(a wrong Q/K permutation or norm offset is undone by the same inverse here). The runs are
therefore also compared with the original, unquantized model: at Q8_0 llama.cpp must stay
within relative RMS 0.07 of it (measured <= 0.035, gemma3; K permuted with the wrong head
count gives 0.93); at Q4_K_M within 0.5 (measured <= 0.29), and at least 4x further from it
than from the dequantized reference (measured 8.6x to 10.9x), which shows the comparison
resolves the weights actually in the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.export.helpers import build_tiny, llama_logits

TP = ("--tokenizer-pre", "smollm")
ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]
TYPES = ["Q4_K_M", "Q8_0"]
IDS = [int(x) for x in np.random.default_rng(0).integers(3, 1024, size=64)]
QK_SCALE = 4.0
REL_RMS = 0.06
MAX_REL = 0.08
MIN_TOP1 = 0.8
PLAIN_BOUND = {"Q4_K_M": 0.5, "Q8_0": 0.07}  # llama.cpp vs the unquantized model
RESOLUTION = 4.0  # Q4_K_M: how much further from the unquantized model than from the reference


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, ``LlamaModel.permute``), verbatim."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Its inverse: HF's rotate-half row order back from llama.cpp's interleaved one."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_the_converter() -> None:
    w = np.random.default_rng(1).standard_normal((128, 8)).astype(np.float32)
    for n_head in (1, 2, 4):
        assert not np.array_equal(converter_permute(w, n_head), w)
        assert np.array_equal(unpermute(converter_permute(w, n_head), n_head), w)


def dequantized_state_dict(path: Path, arch: str, model) -> dict:
    """The GGUF's tensors as gguf-py decodes them, in the HF model's names and layout."""
    import gguf
    import torch
    from gguf.quants import dequantize

    cfg = model.config
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    state, used = {}, set()
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the embedding matrix, loaded through the tie
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert g is not None and g in tensors, (name, g)
        t = tensors[g]
        a = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        a = a.reshape(tuple(reversed([int(n) for n in t.shape])))
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            a = unpermute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            a = unpermute(a, cfg.num_key_value_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            a = a - 1.0
        assert a.shape == tuple(param.shape), (name, a.shape, tuple(param.shape))
        state[name] = torch.from_numpy(np.ascontiguousarray(a))
        used.add(g)
    assert used == set(tensors), sorted(set(tensors) - used)  # every GGUF tensor is a weight
    return state


def hf_logits(folder: Path, arch: str, gguf_path: Path | None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if gguf_path is not None:
        state = dequantized_state_dict(gguf_path, arch, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def sharpen_attention(folder: Path) -> Path:
    """Scale the query and key projections (Phi-3: the q and k rows of qkv_proj) by QK_SCALE."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    qk_rows = (cfg["num_attention_heads"] + cfg["num_key_value_heads"]) * head_dim
    tensors = load_file(folder / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[name] = t * QK_SCALE
        elif name.endswith("qkv_proj.weight"):
            t = t.clone()
            t[:qk_rows] *= QK_SCALE
            tensors[name] = t
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tiny_models(assets, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            d = tmp_path_factory.mktemp(arch)
            cache[arch] = sharpen_attention(build_tiny(d / "model", arch, assets.smollm2_hf))
        return cache[arch]

    return get


def rel_rms(delta: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt((delta**2).mean() / (ref**2).mean()))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_logits_match_transformers(cli, tiny_models, tmp_path, arch, qtype) -> None:
    model = tiny_models(arch)
    out = tmp_path / f"model-{qtype.lower()}.gguf"
    r = cli("-q", "quantize", model, "--method", "kquant", "--type", qtype, "-o", out, *TP)
    assert r.exit_code == 0, r.stderr

    got = llama_logits(out, IDS)
    ref = hf_logits(model, arch, out)
    delta = np.abs(got - ref)
    err = rel_rms(got - ref, ref)
    flips = got.argmax(-1) != ref.argmax(-1)
    top2 = np.sort(ref, -1)[:, -2:]
    margins = top2[flips, 1] - top2[flips, 0]
    print(f"{arch} {qtype}: rel RMS {err:.4f}, max |d| {delta.max():.4f} "
          f"(max |logit| {np.abs(ref).max():.3f}), top-1 {1 - flips.mean():.3f}, "
          f"flip margins {np.round(margins, 4).tolist()}")  # fmt: skip
    assert err < REL_RMS
    assert delta.max() < MAX_REL * np.abs(ref).max()
    assert (margins < delta.max()).all()
    assert 1 - flips.mean() >= MIN_TOP1

    plain = hf_logits(model, arch, None)
    control = rel_rms(got - plain, ref)
    print(f"  vs the unquantized model: rel RMS {control:.4f} ({control / err:.1f}x)")
    assert control < PLAIN_BOUND[qtype]
    if qtype == "Q4_K_M":
        assert control > RESOLUTION * err
