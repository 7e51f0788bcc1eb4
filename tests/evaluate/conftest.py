"""Fixtures for ``qtool eval``: a tiny random Llama with SmolLM2's tokenizer, in F32 and F16, and
GGUF files written from it the way llama.cpp's converter writes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Assets, make_tiny_llama, with_tokenizer

TINY_VOCAB = 49152  # SmolLM2's: the tiny model takes its tokenizer


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's converter, verbatim in numpy (conversion/llama.py, ``LlamaModel.permute``):
    the reference the decoder's inverse is checked against."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(
    src: Path, dst: Path, qtype: str = "F32", tokens: list[str] | None = None
) -> Path:
    """A llama GGUF of an HF Llama checkpoint as convert_hf_to_gguf.py writes it: llama.cpp's
    tensor names, Q/K rows permuted, 2-D weights in ``qtype`` (qtool's codecs), norms F32.
    ``tokens``: the vocabulary to store [default: the checkpoint's tokenizer's]."""
    import gguf
    import torch
    from qtool.kernels import quantize
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((src / "config.json").read_text())
    n_head, n_kv, n_layers = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["num_hidden_layers"],
    )
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    if tokens is None:
        tok = AutoTokenizer.from_pretrained(src)
        tokens = tok.convert_ids_to_tokens(list(range(cfg["vocab_size"])))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    for name, t in load_file(src / "model.safetensors").items():
        a = t.to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            a = llama_permute(a, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            a = llama_permute(a, n_head, n_kv)
        g = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert g is not None, name
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(g, np.ascontiguousarray(a, dtype=np.float32))
        else:
            q = quantize(a, qtype)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, assets: Assets) -> Path:
    """Random 2-layer Llama (256/512, 4 heads, 2 KV heads), vocab and tokenizer of SmolLM2, F32."""
    path = make_tiny_llama(
        tmp_path_factory.mktemp("eval") / "tiny-f32", dtype="float32", vocab_size=TINY_VOCAB
    )
    return with_tokenizer(path, assets)


@pytest.fixture(scope="session")
def tiny_f16(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, assets: Assets) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("eval") / "tiny-f16"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float16).save_pretrained(out)
    return with_tokenizer(out, assets)


@pytest.fixture(scope="session")
def tiny_copy(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """The F32 checkpoint again, under another path: loaded as a second model."""
    out = tmp_path_factory.mktemp("eval") / "tiny-copy"
    shutil.copytree(tiny_base, out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf_f32(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return write_llama_gguf(tiny_base, tmp_path_factory.mktemp("eval") / "tiny-f32.gguf", "F32")


@pytest.fixture(scope="session")
def tiny_gguf_q8(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return write_llama_gguf(tiny_base, tmp_path_factory.mktemp("eval") / "tiny-q8_0.gguf", "Q8_0")
