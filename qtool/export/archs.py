"""Per-architecture GGUF facts: metadata keys and the weight transforms llama.cpp expects.

Each architecture is a small class; the registry maps HF ``model_type`` to it. The transforms
follow llama.cpp's converter (convert_hf_to_gguf.py / conversion/*.py): Llama's Q/K rows are
permuted from HF's rotate-half layout to the interleaved one llama.cpp's RoPE uses; Gemma 3's
RMSNorm weights are stored with the +1 that HF applies at run time, and its embedding keeps
only the rows of real tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from gguf import GGUFWriter

from qtool.errors import UnsupportedError


class GGUFArch:
    """Base: the metadata every decoder-only model has."""

    gguf_arch: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    registry: ClassVar[dict[str, type[GGUFArch]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for mt in cls.model_types:
            GGUFArch.registry[mt] = cls

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        # Multimodal wrappers keep the language model's numbers in text_config.
        self.cfg = {**config, **(config.get("text_config") or {})}
        self.folder = folder

    def get(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        return default

    @property
    def n_layers(self) -> int:
        return int(self.get("num_hidden_layers"))

    @property
    def rope(self) -> dict[str, Any]:
        rp = self.cfg.get("rope_parameters") or self.cfg.get("rope_scaling") or {}
        rp = rp.get("full_attention", rp)
        theta = rp.get("rope_theta", self.cfg.get("rope_theta"))
        return {**rp, "rope_theta": theta}

    def write_metadata(self, w: GGUFWriter) -> None:
        w.add_block_count(self.n_layers)
        if (ctx := self.get("max_position_embeddings")) is not None:
            w.add_context_length(int(ctx))
        w.add_embedding_length(int(self.get("hidden_size")))
        w.add_feed_forward_length(int(self.get("intermediate_size")))
        w.add_head_count(int(self.get("num_attention_heads")))
        w.add_head_count_kv(int(self.get("num_key_value_heads", "num_attention_heads")))
        rope = self.rope
        rope_type = rope.get("rope_type") or rope.get("type")
        if rope_type == "linear" and rope.get("factor"):
            w.add_rope_scaling_type(_rope_scaling("LINEAR"))
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif rope_type not in (None, "default"):
            raise UnsupportedError(
                f"RoPE scaling {rope_type!r} is not supported for GGUF export yet",
                hint="supported: none (default) and linear",
            )
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(float(rope["rope_theta"]))
        if (eps := self.get("rms_norm_eps")) is not None:
            w.add_layer_norm_rms_eps(float(eps))
        if (head_dim := self.cfg.get("head_dim")) is not None:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))

    def transform(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def shape_after(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``transform`` gives, known before any data is read (for the plan)."""
        return shape

    def rows_independent(self, hf_name: str) -> bool:
        """Whether ``transform`` keeps each row as it is (at most dropping trailing rows), so
        the tensor can stream in row chunks of the planned shape."""
        return True

    def skip(self, hf_name: str) -> bool:
        """Tensors llama.cpp does not load (rotary caches, a duplicated tied lm_head)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return True
        return bool(self.cfg.get("tie_word_embeddings")) and hf_name == "lm_head.weight"


def _rope_scaling(name: str) -> Any:
    import gguf

    return gguf.RopeScalingType[name]


class LlamaArch(GGUFArch):
    gguf_arch = "llama"
    model_types = ("llama", "mistral")

    def write_metadata(self, w: GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_vocab_size(int(self.get("vocab_size")))
        head_dim = self.cfg.get("head_dim") or self.get("hidden_size") // self.get(
            "num_attention_heads"
        )
        w.add_rope_dimension_count(int(head_dim))

    def rows_independent(self, hf_name: str) -> bool:
        return not hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))

    def transform(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        n_head = int(self.get("num_attention_heads"))
        if hf_name.endswith("self_attn.q_proj.weight"):
            return permute_qk(t, n_head)
        if hf_name.endswith("self_attn.k_proj.weight"):
            return permute_qk(t, int(self.get("num_key_value_heads", "num_attention_heads")))
        return t


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores each head's rotary pairs as (first half, second half); llama.cpp's RoPE wants
    them interleaved. Rows of each head go from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...]."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Qwen2Arch(GGUFArch):
    gguf_arch = "qwen2"
    model_types = ("qwen2",)


class Qwen3Arch(GGUFArch):
    gguf_arch = "qwen3"
    model_types = ("qwen3",)


class Phi3Arch(GGUFArch):
    gguf_arch = "phi3"
    model_types = ("phi3",)

    def write_metadata(self, w: GGUFWriter) -> None:
        rope = self.rope
        if (rope.get("rope_type") or rope.get("type")) not in (None, "default"):
            raise UnsupportedError(
                "Phi-3 long-context RoPE (longrope) is not supported for export yet"
            )
        super().write_metadata(w)
        n_embd, n_head = int(self.get("hidden_size")), int(self.get("num_attention_heads"))
        partial = float(self.get("partial_rotary_factor", default=1.0))
        w.add_rope_dimension_count(int(n_embd // n_head * partial))
        # llama.cpp tells Phi-4 (no sliding window) from Phi-3 by a zero window.
        w.add_sliding_window(int(self.cfg.get("sliding_window") or 0))
        if (orig := self.rope.get("original_max_position_embeddings")) is not None:
            w.add_rope_scaling_orig_ctx_len(int(orig))


class Gemma3Arch(GGUFArch):
    gguf_arch = "gemma3"
    model_types = ("gemma3", "gemma3_text")

    def write_metadata(self, w: GGUFWriter) -> None:
        head_dim = int(self.get("head_dim", default=256))
        # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer
        # 27B); HF by query_pre_attn_scalar**-0.5. A model where they differ would run wrong.
        n_layers, hidden = self.n_layers, int(self.get("hidden_size"))
        expect = hidden // int(self.get("num_attention_heads")) if n_layers == 62 else head_dim
        qpas = self.cfg.get("query_pre_attn_scalar", expect)
        if qpas != expect:
            raise UnsupportedError(
                f"Gemma 3 with query_pre_attn_scalar={qpas} (llama.cpp assumes {expect}) "
                "cannot be exported faithfully"
            )
        super().write_metadata(w)
        if "head_dim" not in self.cfg:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if self.cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(self.cfg["final_logit_softcapping"]))
        if self.cfg.get("sliding_window_pattern") != 1 and self.cfg.get("sliding_window"):
            w.add_sliding_window(int(self.cfg["sliding_window"]))
            if self.cfg.get("layer_types"):  # llama.cpp's default is 5 local : 1 global
                w.add_sliding_window_pattern(
                    [str(t).startswith("sliding") for t in self.cfg["layer_types"]]
                )
        sliding = (self.cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
        if sliding.get("rope_theta") is not None:
            w.add_rope_freq_base_swa(float(sliding["rope_theta"]))

    def n_vocab_real(self) -> int | None:
        """Rows of real tokens: Gemma checkpoints pad the embedding beyond the vocabulary."""
        tj = self.folder / "tokenizer.json"
        if (self.folder / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            sp = SentencePieceProcessor()
            sp.LoadFromFile(str(self.folder / "tokenizer.model"))
            return int(sp.vocab_size())
        if tj.is_file():
            data = json.loads(tj.read_text())
            return len(data["model"]["vocab"]) + len(
                [t for t in data["added_tokens"] if t["id"] >= len(data["model"]["vocab"])]
            )
        return None

    def shape_after(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if hf_name.endswith("embed_tokens.weight"):
            n = self.n_vocab_real()
            if n is not None and n < shape[0]:
                return (n, *shape[1:])
        return shape

    def rows_independent(self, hf_name: str) -> bool:
        return not hf_name.endswith("norm.weight")

    def transform(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        if hf_name.endswith("embed_tokens.weight"):
            n = self.n_vocab_real()
            if n is not None and n < t.shape[0]:
                t = t[:n]
        if hf_name.endswith("norm.weight"):
            # HF's Gemma3RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored weight.
            t = t.float() + 1.0
        return t


def arch_for(config: dict[str, Any], folder: Path) -> GGUFArch:
    model_type = str({**config, **(config.get("text_config") or {})}.get("model_type", "unknown"))
    cls = GGUFArch.registry.get(model_type)
    if cls is None:
        supported = ", ".join(sorted(GGUFArch.registry))
        raise UnsupportedError(
            f"architecture {model_type!r} is not supported for GGUF export",
            hint=f"supported: {supported}; `qtool inspect` still works on it",
        )
    return cls(config, folder)
