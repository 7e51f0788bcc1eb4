"""Qwen 2 and Qwen 3 (llama.cpp arches ``qwen2``, ``qwen3``): tensors stored as they are;
Qwen 3 adds per-head q/k norms, which gguf-py's name map already knows."""

from __future__ import annotations

from typing import Any

from qtool.models.base import Family


class Qwen2(Family):
    hf_types = ("qwen2",)
    gguf_arch = "qwen2"


class Qwen3(Family):
    hf_types = ("qwen3",)
    gguf_arch = "qwen3"

    def gguf_config_extras(
        self, cfg: Any, gguf: Any, rope: dict[str, Any], key: Any, put: Any
    ) -> dict[str, Any]:
        rope = super().gguf_config_extras(cfg, gguf, rope, key, put)
        # Qwen 3 heads are not hidden/heads wide (e.g. 128 for 1024/16); transformers' qwen3
        # mapping drops attention.key_length, leaving Qwen3Config's default of 128.
        if (head_dim := key("attention.key_length")) is not None:
            put("head_dim", int(head_dim))
        return rope
