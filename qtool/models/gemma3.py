"""Gemma 3 text models (llama.cpp arch ``gemma3``).

llama.cpp's converter (``conversion/gemma.py``, ``Gemma3Model``): RMSNorm weights are stored
as ``w + 1`` because ``Gemma3RMSNorm`` multiplies by ``1 + w`` and llama.cpp by the stored
weight (``norm_shift``); the embedding keeps only the rows of real tokens (checkpoints pad it);
sliding-window layers every ``sliding_window_pattern``-th layer global.
"""

from __future__ import annotations

import json
from typing import Any

from qtool.errors import UnsupportedError
from qtool.models.base import Family


class Gemma3(Family):
    hf_types = ("gemma3", "gemma3_text")
    gguf_arch = "gemma3"
    smooth_pairs = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    norm_offset = True

    def layer_types(self) -> list[str]:
        if self.cfg.get("layer_types") or not self.cfg.get("sliding_window"):
            return super().layer_types()
        # every sliding_window_pattern-th layer is global, the rest local
        pattern = int(self.cfg.get("sliding_window_pattern") or 6)
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(self.n_layers)]

    def check_gguf(self) -> None:
        head_dim = int(self.get("head_dim", default=256))
        # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer
        # 27B); HF by query_pre_attn_scalar**-0.5. A model where they differ would run wrong.
        hidden = int(self.get("hidden_size"))
        expect = hidden // self.n_head if self.n_layers == 62 else head_dim
        qpas = self.cfg.get("query_pre_attn_scalar", expect)
        if qpas != expect:
            raise UnsupportedError(
                f"Gemma 3 with query_pre_attn_scalar={qpas} (llama.cpp assumes {expect}) "
                "cannot be exported faithfully"
            )
        super().check_gguf()

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=256))

    def write_gguf_metadata(self, w: Any) -> None:
        super().write_gguf_metadata(w)
        if "head_dim" not in self.cfg:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
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
        if self.folder is not None and (self.folder / "tokenizer.model").is_file():
            # Gemma3Model.set_vocab: a SentencePiece vocabulary without the prefix space
            w.add_add_space_prefix(False)

    def n_vocab_real(self) -> int | None:
        """Rows of real tokens: Gemma checkpoints pad the embedding beyond the vocabulary."""
        if self.folder is None:
            return None
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

    def shape_to_gguf(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if hf_name.endswith("embed_tokens.weight"):
            n = self.n_vocab_real()
            if n is not None and n < shape[0]:
                return (n, *shape[1:])
        return shape

    def changes_values(self, hf_name: str) -> bool:
        return hf_name.endswith("norm.weight")

    def rows_independent(self, hf_name: str) -> bool:
        return not self.changes_values(hf_name)

    def to_gguf(self, hf_name: str, t: Any) -> Any:
        if hf_name.endswith("embed_tokens.weight"):
            n = self.n_vocab_real()
            if n is not None and n < t.shape[0]:
                t = t[:n]
        if hf_name.endswith("norm.weight"):
            # HF's Gemma3RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored weight.
            t = t.astype("float32") + 1.0 if hasattr(t, "astype") else t.float() + 1.0
        return t

    def from_gguf(self, hf_name: str, t: Any) -> Any:
        if hf_name.endswith("norm.weight"):
            return t - 1.0
        return t

    def gguf_config_extras(
        self, cfg: Any, gguf: Any, rope: dict[str, Any], key: Any, put: Any
    ) -> dict[str, Any]:
        n_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        hd = int(key("attention.key_length") or cfg.head_dim)
        # llama.cpp scales queries by 1/sqrt(head_dim), and by 1/sqrt(hidden/heads) for the
        # 62-layer 27B (llm_build_gemma3: f_attention_scale); HF by query_pre_attn_scalar**-0.5,
        # whose Gemma3TextConfig default (256) the GGUF does not override.
        put(
            "query_pre_attn_scalar",
            hidden // int(cfg.num_attention_heads) if n_layers == 62 else hd,
        )
        # Which layers slide: the per-layer pattern when the file has one (qtool and newer
        # llama.cpp converters write it), else llama.cpp's default of 5 local : 1 global.
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == n_layers:
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [(i + 1) % 6 != 0 for i in range(n_layers)]
        put("layer_types", ["sliding_attention" if s else "full_attention" for s in sliding])
        # Local layers: rope.freq_base_swa, llama.cpp's default 10000; linear scaling applies
        # to the global layers only (llama.cpp keeps rope_freq_scale_train_swa at 1).
        full = dict(rope.get("full_attention") or {"rope_type": "default"})
        local = dict(rope.get("sliding_attention") or {"rope_type": "default"})
        full["rope_theta"] = float(key("rope.freq_base", 10000.0))
        local["rope_theta"] = float(key("rope.freq_base_swa", 10000.0))
        if key("rope.scaling.type") == "linear" and key("rope.scaling.factor"):
            full.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
        return {"full_attention": full, "sliding_attention": local}
