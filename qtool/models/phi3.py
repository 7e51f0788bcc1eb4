"""Phi-3, Phi-3.5 and Phi-4 (llama.cpp arch ``phi3``): fused ``qkv_proj`` and ``gate_up_proj``,
partial rotary dimension, long-context RoPE ("longrope").

llama.cpp's converter (``conversion/phi.py``, ``Phi3MiniModel``): tensors stored as they are;
its own hyper-parameter set (no ``TextModel`` keys: no rope-scaling type, no key length): the
rotary dimension ``int(partial_rotary_factor * hidden) // heads``, the original context length
(``rope.scaling.original_context_length``, Phi3Config's 4096 when the config has none) and the
sliding window (0 marks Phi-4, whose attention is full). With ``longrope`` (Phi-3.5, Phi-4-mini)
it generates ``rope_factors_long.weight`` and ``rope_factors_short.weight`` (one factor per
rotary pair; llama.cpp uses the long ones when the context exceeds the original length, as
transformers does when the sequence does) and writes ``rope.scaling.attn_factor``, the cos/sin
scale ``sqrt(1 + ln(s) / ln(original))`` for ``s = max_position_embeddings / original``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

from qtool.errors import UnsupportedError
from qtool.models.base import Family, GGUFTensor

# Phi3Config's default original_max_position_embeddings
PHI3_ORIG_CTX = 4096
FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


class Phi3(Family):
    hf_types = ("phi3",)
    gguf_arch = "phi3"
    smooth_pairs = (
        ("input_layernorm", ("self_attn.qkv_proj",)),
        ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    )
    gguf_runtime_tensors: ClassVar[tuple[str, ...]] = FACTORS

    @property
    def partial_rotary_factor(self) -> float:
        return float(
            self.rope.get("partial_rotary_factor") or self.get("partial_rotary_factor") or 1.0
        )

    @property
    def n_rot(self) -> int:
        """The rotary dimension, as llama.cpp's converter rounds it."""
        return int(self.partial_rotary_factor * int(self.get("hidden_size"))) // self.n_head

    @property
    def orig_ctx(self) -> int:
        rope = self.rope
        orig = self.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings"
        )
        return int(orig or PHI3_ORIG_CTX)

    @property
    def longrope(self) -> bool:
        return self.rope_type in ("longrope", "su") and bool(self.rope.get("long_factor"))

    def attn_factor(self) -> float:
        """transformers' longrope cos/sin scale: the config's ``attention_factor``, else the
        paper's value for the context extension (what llama.cpp's converter always writes)."""
        explicit = self.rope.get("attention_factor")
        if explicit is not None:
            return float(explicit)
        scale = int(self.get("max_position_embeddings")) / self.orig_ctx
        return math.sqrt(1 + math.log(scale) / math.log(self.orig_ctx)) if scale > 1.0 else 1.0

    def check_gguf(self) -> None:
        # llama.cpp's Phi-3 knows plain RoPE and longrope only (no linear scaling keys).
        if self.rope_type not in (None, "longrope", "su"):
            raise UnsupportedError(
                f"RoPE scaling {self.rope_type!r} is not supported for GGUF export of phi3",
                hint="supported: none (default), longrope",
            )
        if self.rope_type is None:
            return
        rope = self.rope
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long or not short:
            raise UnsupportedError(
                f"Phi-3 {self.rope_type} RoPE without long_factor and short_factor lists"
            )
        if len(long) != len(short) or 2 * len(long) != self.n_rot:
            raise UnsupportedError(
                f"Phi-3 longrope factors of length {len(long)}/{len(short)}: llama.cpp needs "
                f"one per rotary pair ({self.n_rot // 2})"
            )
        if rope.get("factor") is not None and rope.get("attention_factor") is None:
            ratio = int(self.get("max_position_embeddings")) / self.orig_ctx
            if not math.isclose(float(rope["factor"]), ratio):
                # transformers prefers rope "factor" for the default attention factor; llama.cpp's
                # converter the context ratio. Written explicitly they would agree; not here.
                raise UnsupportedError(
                    f"Phi-3 longrope with factor {rope['factor']} != max/original context "
                    f"{ratio}: the attention factor would differ from transformers'"
                )

    def write_gguf_metadata(self, w: Any) -> None:
        # Phi3MiniModel.set_gguf_parameters, which writes none of TextModel's keys but these.
        self.check_gguf()
        w.add_context_length(int(self.get("max_position_embeddings")))
        w.add_rope_scaling_orig_ctx_len(self.orig_ctx)
        w.add_embedding_length(int(self.get("hidden_size")))
        w.add_feed_forward_length(int(self.get("intermediate_size")))
        w.add_block_count(self.n_layers)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(self.get("rms_norm_eps")))
        w.add_rope_dimension_count(self.n_rot)
        w.add_rope_freq_base(float(self.rope.get("rope_theta") or 10000.0))
        w.add_sliding_window(int(self.cfg.get("sliding_window") or 0))
        if self.longrope:
            w.add_rope_scaling_attn_factors(self.attn_factor())

    def generated_tensors(self) -> list[GGUFTensor]:
        if not self.longrope:
            return []
        out = []
        for name, key in zip(FACTORS, ("long_factor", "short_factor"), strict=True):
            values = [float(x) for x in self.rope[key]]

            def build(_inputs: list[Any], values: list[float] = values) -> Iterator[Any]:
                import numpy as np

                yield np.asarray(values, dtype=np.float32)

            out.append(GGUFTensor(name, (len(values),), (), build, float_only=True))
        return out

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
        orig = key("rope.scaling.original_context_length")
        if orig is not None:
            put("original_max_position_embeddings", int(orig))
        if FACTORS[0] in gguf.tensors:
            rope.update(longrope_from_factors(gguf, key, int(orig or PHI3_ORIG_CTX)))
        return rope


def longrope_from_factors(gguf: Any, key: Any, orig: int) -> dict[str, Any]:
    """HF's "longrope" rope_parameters from a GGUF's factor tensors (the inverse of
    :meth:`Phi3.generated_tensors`); the attention factor as the file has it."""
    from qtool.gguf_meta import read_gguf_tensor

    long = read_gguf_tensor(gguf, FACTORS[0]).reshape(-1)
    short = read_gguf_tensor(gguf, FACTORS[1]).reshape(-1)
    out: dict[str, Any] = {
        "rope_type": "longrope",
        "long_factor": [float(x) for x in long],
        "short_factor": [float(x) for x in short],
        "original_max_position_embeddings": orig,
    }
    if (attn := key("rope.scaling.attn_factor")) is not None:
        out["attention_factor"] = float(attn)
    return out
