"""llama.cpp (through llama-cpp-python) as the reference for GGUF export tests."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

TINY_VOCAB = 1024


def small_tokenizer(src: Path, dst: Path, n: int = TINY_VOCAB) -> None:
    """SmolLM2's byte-level BPE cut to its first ``n`` ids: the same pre-tokenizer, every byte
    symbol, and the merges that stay inside the cut. Its check-text ids change with the cut,
    so exports name the pre-tokenizer (``--tokenizer-pre smollm``)."""
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < n}
    merges = []
    for m in data["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    data["model"]["vocab"], data["model"]["merges"] = vocab, merges
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n]
    (dst / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")


# Llama 3.1's rope scaling with a short original context, so that at test lengths many
# rotary dimensions are scaled (the real models: original_max_position_embeddings 8192).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
# Phi-3.5 / Phi-4-mini "longrope": per-dimension factors, short ones up to the original
# context, long ones beyond it (shaped like the published lists: near 1 for the fast
# dimensions, growing for the slow ones).
PHI3_ORIG_CTX = 64


def longrope(n: int) -> dict[str, object]:
    ramp = np.linspace(0.0, 1.0, n)
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [round(float(1.0 + 1.8 * x**2), 4) for x in ramp],
        "long_factor": [round(float(1.0 + 63.0 * x**3), 4) for x in ramp],
    }


def family_configs(tf: Any, common: dict[str, object]) -> dict[str, Any]:
    """Tiny configs of the dense families with their real config features."""

    def c(**kw: object) -> dict[str, object]:
        return {**common, **kw}

    return {
        "llama3": lambda: tf.LlamaConfig(
            **c(tie_word_embeddings=False, rope_parameters=dict(LLAMA3_ROPE))
        ),
        "mistral": lambda: tf.MistralConfig(
            **c(
                tie_word_embeddings=False,
                sliding_window=None,
                head_dim=64,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            )
        ),
        # Phi-4-mini-like: longrope with a partial rotary dimension (0.75 of 64 -> 24 factors)
        "phi3-longrope": lambda: tf.Phi3Config(
            **c(
                pad_token_id=0,
                tie_word_embeddings=False,
                max_position_embeddings=4096,
                original_max_position_embeddings=PHI3_ORIG_CTX,
                partial_rotary_factor=0.75,
                rope_parameters={**longrope(24), "partial_rotary_factor": 0.75},
            )
        ),
        # Gemma 2: soft-capped attention and logits, sliding window every other layer; larger
        # weights and small caps so that the caps change the outputs of a random model.
        "gemma2": lambda: tf.Gemma2Config(
            **c(
                head_dim=64,
                query_pre_attn_scalar=64,
                sliding_window=32,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0,
                initializer_range=0.1,
                bos_token_id=2,
                eos_token_id=1,
                pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
        ),
        "olmo2": lambda: tf.Olmo2Config(
            **c(
                tie_word_embeddings=False,
                rms_norm_eps=1e-6,
                pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            )
        ),
        # Granite 3.x 2B's multipliers (attention 1/64 for its 64-wide heads)
        "granite": lambda: tf.GraniteConfig(
            **c(
                tie_word_embeddings=True,
                embedding_multiplier=12.0,
                residual_multiplier=0.22,
                attention_multiplier=0.015625,
                logits_scaling=8.0,
                rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
        ),
        # SmolLM3: every 4th layer without RoPE, so 4 layers
        "smollm3": lambda: tf.SmolLM3Config(
            **c(
                num_hidden_layers=4,
                tie_word_embeddings=True,
                pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
            )
        ),
    }


def spm_tokenizer(dst: Path, text: Path, n: int = TINY_VOCAB) -> Path:
    """A SentencePiece BPE tokenizer (``tokenizer.model``) of ``n`` pieces trained on ``text``,
    with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and byte fallback: the kind of
    vocabulary llama.cpp's converter reads with sentencepiece (Gemma 2's ``tokenizer.model``)."""
    import io

    import sentencepiece as spm

    dst.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    lines = [ln for ln in text.read_text(encoding="utf-8").splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=n,
        model_type="bpe",
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    (dst / "tokenizer.model").write_bytes(buf.getvalue())
    return dst


def build_tiny(
    path: Path, arch: str, tokenizer_dir: Path, *, full_vocab: bool = False, **overrides: object
) -> Path:
    """A random 2-layer model of ``arch`` with 256-multiple dims. Its tokenizer is SmolLM2's
    (``full_vocab``: vocab 49152, recognised by hash) or a 1024-token cut of it (fast)."""
    import torch
    import transformers as tf

    vocab = 49152 if full_vocab else TINY_VOCAB
    common = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2": lambda: tf.Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=64, tie_word_embeddings=True),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **common,
            head_dim=64,
            sliding_window=32,
            query_pre_attn_scalar=64,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0, tie_word_embeddings=False),
        **family_configs(tf, common),
    }
    cfg = configs[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():  # norms away from 1 so a missing +1 or permutation would show
        for p in model.parameters():
            if p.ndim == 1:
                offset = 0.0 if arch.startswith(("gemma2", "gemma3")) else 0.75
                p.copy_(torch.rand_like(p) * 0.5 + offset)
    model.save_pretrained(path, safe_serialization=True)
    if (tokenizer_dir / "tokenizer.model").is_file():  # a SentencePiece tokenizer folder
        for f in ("tokenizer.model", "tokenizer_config.json"):
            if (tokenizer_dir / f).is_file():
                shutil.copy(tokenizer_dir / f, path / f)
    elif full_vocab:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / f, path / f)
    else:
        small_tokenizer(tokenizer_dir, path)
    if arch.startswith("phi3"):
        # Phi-4's tokenizer class: llama.cpp's Phi-3 converter reads a byte-level BPE
        # tokenizer.json only for GPT2Tokenizer (else it wants Phi-3's tokenizer.model).
        tc = path / "tokenizer_config.json"
        data = json.loads(tc.read_text(encoding="utf-8"))
        data["tokenizer_class"] = "GPT2Tokenizer"
        tc.write_text(json.dumps(data), encoding="utf-8")
    return path


def llama_ftype(preset: str) -> int:
    """llama.cpp's ``llama_ftype`` for a llama-quantize preset name (``Q4_K_M``, ``F16``...)."""
    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if preset == "F32" else f"LLAMA_FTYPE_MOSTLY_{preset}"
    return int(getattr(llama_cpp, name))


def llama_quantize(
    src: Path,
    dst: Path,
    preset: str,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
    pure: bool = False,
    output_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: list[tuple[str, str]] | None = None,
    allow_requantize: bool = False,
) -> None:
    """llama.cpp's own quantizer (llama_model_quantize == llama-quantize), with an imatrix and
    the same per-tensor options llama-quantize has (``allow_requantize``: its
    ``--allow-requantize``, for a source with quantized tensors). Preset and type ids come from
    llama.cpp (``LLAMA_FTYPE_*``) and gguf-py, not from qtool's tables."""
    import llama_cpp
    from gguf import GGMLQuantizationType

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_ftype(preset)
    p.nthread = 2
    p.pure = pure
    p.allow_requantize = allow_requantize
    if output_type:
        p.output_tensor_type = GGMLQuantizationType[output_type].value
    if token_embedding_type:
        p.token_embedding_type = GGMLQuantizationType[token_embedding_type].value
    keep: list[object] = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep += [buf, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, type(p.imatrix))
    if tensor_types:
        ov = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            keep.append(pattern.encode())
            ov[i].pattern = keep[-1]
            ov[i].type = GGMLQuantizationType[qtype].value
        ov[len(tensor_types)].pattern = None
        keep.append(ov)
        p.tt_overrides = ctypes.cast(ov, type(p.tt_overrides))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize failed ({rc})"


def llama_quantize_types(src: Path, preset: str) -> dict[str, str]:
    """{tensor: type} llama-quantize chooses for ``src`` (``llama_model_quantize`` with
    ``dry_run``: nothing read but the header, nothing written), from llama.cpp's log."""
    import re

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_ftype(preset)
    p.dry_run = True
    p.nthread = 1
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        out = str(src.with_suffix(".dry-run.gguf")).encode()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), out, ctypes.byref(p))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    assert rc == 0, "".join(lines)[-2000:]
    # "[  12/ 147] blk.0.attn_k.weight - [ 2048, 512, 1, 1], type = f16, size = ... (q4_K)"
    rule = r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\w+), size =[^\n]*?(?:\((\w+)\))?\n"
    found = re.finditer(rule, "".join(lines))
    return {m.group(1): (m.group(3) or m.group(2)).upper() for m in found}


def gguf_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


def compare_files(ref: Path, mine: Path) -> tuple[list[str], list[str]]:
    """(tensors whose type differs, tensors whose bytes differ)."""
    a, b = gguf_tensors(ref), gguf_tensors(mine)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    types = [f"{n}: llama.cpp {a[n][0]} vs qtool {b[n][0]}" for n in a if a[n][0] != b[n][0]]
    data = [n for n in a if a[n][0] == b[n][0] and a[n][1] != b[n][1]]
    return types, data


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    from qtool.llamacpp import open_llama

    llm = open_llama(path, n_ctx=max(512, len(ids)), logits_all=True, n_threads=2, n_batch=512)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    from qtool.llamacpp import open_llama

    llm = open_llama(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    finally:
        llm.close()


def write_imatrix(path: Path, imatrix: dict[str, np.ndarray]) -> None:
    """An imatrix GGUF as llama-imatrix writes it: NAME.in_sum2 and NAME.counts (count 1)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    for name, v in imatrix.items():
        w.add_tensor(f"{name}.in_sum2", np.asarray(v, np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.ones((1, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
