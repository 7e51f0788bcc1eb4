"""Phi-3 / Phi-4 (llama.cpp arch ``phi3``): fused ``qkv_proj`` and ``gate_up_proj``, partial
rotary dimension, and the sliding-window key llama.cpp uses to tell Phi-4 (0) from Phi-3."""

from __future__ import annotations

from typing import Any

from qtool.errors import UnsupportedError
from qtool.models.base import Family


class Phi3(Family):
    hf_types = ("phi3",)
    gguf_arch = "phi3"
    smooth_pairs = (
        ("input_layernorm", ("self_attn.qkv_proj",)),
        ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    )

    def check_gguf(self) -> None:
        if self.rope_type is not None:
            raise UnsupportedError(
                "Phi-3 long-context RoPE (longrope) is not supported for export yet"
            )
        super().check_gguf()

    def write_gguf_metadata(self, w: Any) -> None:
        super().write_gguf_metadata(w)
        n_embd = int(self.get("hidden_size"))
        partial = float(self.get("partial_rotary_factor", default=1.0))
        w.add_rope_dimension_count(int(n_embd // self.n_head * partial))
        w.add_sliding_window(int(self.cfg.get("sliding_window") or 0))
        if (orig := self.rope.get("original_max_position_embeddings")) is not None:
            w.add_rope_scaling_orig_ctx_len(int(orig))

    def gguf_config_extras(
        self, cfg: Any, gguf: Any, rope: dict[str, Any], key: Any, put: Any
    ) -> dict[str, Any]:
        rope = super().gguf_config_extras(cfg, gguf, rope, key, put)
        # llama.cpp applies a sliding window when phi3.attention.sliding_window is non-zero
        # (0 marks Phi-4, whose attention is full).
        window = int(key("attention.sliding_window", 0) or 0)
        put("sliding_window", window or None)
        n_rot = key("rope.dimension_count")
        hd = int(cfg.hidden_size) // int(cfg.num_attention_heads)
        if n_rot is not None and int(n_rot) != hd:
            rope["partial_rotary_factor"] = int(n_rot) / hd
        if (orig := key("rope.scaling.original_context_length")) is not None:
            put("original_max_position_embeddings", int(orig))
        return rope
