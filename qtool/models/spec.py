"""``ModelSpec``: a model's config normalised into the numbers reports need (any architecture,
supported or not: ``qtool inspect`` reads them from headers alone). Per-family facts (sliding
layers, names) come from the family registry (:mod:`qtool.models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        from qtool.models.base import Family

        return self.model_type in Family.registry

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
        from qtool.models import family_for

        layer_types = tuple(family_for(config, strict=False).layer_types()) or ("full",) * n_layers
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
