"""Architecture facts: a normalised view of a model's config and llama.cpp's tensor names.

``ModelSpec`` turns a Hugging Face config (or the config derived from GGUF metadata) into the
numbers reports need. ``gguf_name`` maps a Hugging Face tensor name to the name llama.cpp uses,
through gguf-py's ``TensorNameMap`` (the same table llama.cpp's converter uses).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# Hugging Face model_type -> gguf-py architecture name. These are the architectures whose
# export qtool supports; others can still be inspected.
GGUF_ARCH = {
    "llama": "LLAMA",
    "mistral": "LLAMA",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "gemma3": "GEMMA3",
    "gemma3_text": "GEMMA3",
    "phi3": "PHI3",
}

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "output", "other")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    architecture: str
    n_layers: int
    hidden: int
    intermediate: int | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int | None
    max_context: int | None
    tied_embeddings: bool
    sliding_window: int | None
    layer_types: tuple[str, ...]  # "full" or "sliding" per layer
    dtype: str | None

    @property
    def supported(self) -> bool:
        return self.model_type in GGUF_ARCH

    @property
    def n_gqa(self) -> int:
        return self.n_heads // max(1, self.n_kv_heads)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        # Multimodal wrappers keep the language model's numbers in text_config: those win.
        cfg = {**config, **(config.get("text_config") or {})}
        model_type = str(cfg.get("model_type", "unknown"))
        archs = cfg.get("architectures") or [model_type]
        n_layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
        hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
        n_heads = _int(cfg, "num_attention_heads", "n_head")
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        sliding = cfg.get("sliding_window")
        layer_types = tuple(_layer_types(cfg, model_type, n_layers, sliding))
        return cls(
            model_type=model_type,
            architecture=str(archs[0]),
            n_layers=n_layers,
            hidden=hidden,
            intermediate=cfg.get("intermediate_size"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab=cfg.get("vocab_size"),
            max_context=cfg.get("max_position_embeddings"),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding and "sliding" in layer_types else None,
            layer_types=layer_types,
            dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


def _int(cfg: dict[str, Any], *keys: str) -> int:
    for k in keys:
        if cfg.get(k) is not None:
            return int(cfg[k])
    from qtool.errors import UnsupportedError

    raise UnsupportedError(f"config has none of {', '.join(keys)}: cannot read the model's shape")


def _layer_types(cfg: dict[str, Any], model_type: str, n_layers: int, sliding: Any) -> list[str]:
    if cfg.get("layer_types"):
        return ["sliding" if "sliding" in str(t) else "full" for t in cfg["layer_types"]]
    if model_type.startswith("gemma3") and sliding:
        # Gemma 3: every sliding_window_pattern-th layer is global, the rest local.
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers)]
    return ["full"] * n_layers


@lru_cache(maxsize=32)
def _name_map(gguf_arch: str, n_layers: int) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch], n_layers)


def gguf_name(hf_name: str, model_type: str, n_layers: int) -> str | None:
    """llama.cpp's name for a Hugging Face tensor name, or None when it has no mapping."""
    if hf_name.startswith(("token_embd.", "output", "blk.")):
        return hf_name  # already a GGUF name
    arch = GGUF_ARCH.get(model_type, "LLAMA")  # unknown archs: llama's names are the best guess
    name = re.sub(r"^model\.language_model\.", "model.", hf_name)
    return _name_map(arch, n_layers).get_name(name, try_suffixes=(".weight", ".bias"))


def component(gguf_or_hf_name: str, ndim: int) -> str:
    """Which part of the model a tensor belongs to, for the parameter breakdown."""
    n = gguf_or_hf_name
    if "norm" in n or (ndim == 1 and "layernorm" in n):
        return "norms"
    if n.startswith("token_embd") or "embed_tokens" in n or "wte" in n:
        return "embeddings"
    if n.startswith("output.") or n.startswith("lm_head"):
        return "output"
    if "attn" in n or "self_attn" in n or "attention" in n:
        return "attention"
    if "ffn" in n or "mlp" in n:
        return "mlp"
    return "other"


_DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\..+\.weight$")


def is_decoder_linear(hf_name: str, ndim: int) -> bool:
    """A decoder layer's linear weight (``model.layers.N.self_attn.q_proj.weight``, ...): what
    RTN, GPTQ and BitNet quantize; embeddings, norms and the output head are not."""
    return ndim == 2 and _DECODER_LINEAR.search(hf_name) is not None
