"""Gemma 2 (llama.cpp arch ``gemma2``).

llama.cpp's converter (``conversion/gemma.py``, ``Gemma2Model``): RMSNorm weights stored as
``w + 1`` (``Gemma2RMSNorm`` multiplies by ``1 + w``, llama.cpp by the stored weight), no
``lm_head`` (llama.cpp's output is the embedding matrix); its own hyper-parameter set (none of
``TextModel``'s RoPE keys): key/value length, the attention and final logit soft-caps and the
sliding window. The rest is llama.cpp's fixed Gemma 2 graph, which the config must match:
embeddings scaled by ``sqrt(hidden)``, sliding-window attention on every even layer
(``set_swa_pattern(2)``), queries scaled by ``1/sqrt(head_dim)`` (``1/sqrt(hidden/heads)`` for the
46-layer 27B), both soft-caps always on, RoPE base 10000 unless the file says otherwise.

Soft-capping needs transformers' eager attention (SDPA has no soft-cap): the layer runner
builds Gemma 2 layers with ``attn_implementation="eager"``.
"""

from __future__ import annotations

from typing import Any

from qtool.errors import UnsupportedError
from qtool.models.base import Family

# llama.cpp's defaults when a key is absent (llama_hparams), also Gemma2Config's
LLAMA_ATTN_SOFTCAP, LLAMA_FINAL_SOFTCAP, LLAMA_ROPE_BASE = 50.0, 30.0, 10000.0
LLAMA_WINDOW = 4096
DEFAULTS = {
    "attn_logit_softcapping": LLAMA_ATTN_SOFTCAP,
    "final_logit_softcapping": LLAMA_FINAL_SOFTCAP,
    "sliding_window": LLAMA_WINDOW,
}
N_LAYERS_27B = 46


class Gemma2(Family):
    hf_types = ("gemma2",)
    gguf_arch = "gemma2"
    smooth_pairs = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    norm_offset = True
    attn_implementation = "eager"

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=256))

    def value(self, key: str) -> Any:
        """A config value, Gemma2Config's default when the config leaves it out."""
        return self.cfg.get(key, DEFAULTS[key])

    @property
    def logit_softcap(self) -> float | None:
        v = self.value("final_logit_softcapping")
        return float(v) if v else None

    @property
    def tied(self) -> bool:
        return bool(self.cfg.get("tie_word_embeddings", True))  # Gemma2Config's default

    def layer_types(self) -> list[str]:
        if self.cfg.get("layer_types"):
            return super().layer_types()
        # Gemma2Config's default: every even layer local (sliding), every odd one global
        return ["sliding" if i % 2 == 0 else "full" for i in range(self.n_layers)]

    def expected_query_scalar(self) -> int:
        """What llama.cpp scales queries by (as ``1/sqrt`` of it)."""
        if self.n_layers == N_LAYERS_27B:
            return int(self.get("hidden_size")) // self.n_head
        return self.head_dim

    def check_gguf(self) -> None:
        def refuse(what: str) -> None:
            raise UnsupportedError(
                f"Gemma 2 with {what} cannot be exported faithfully: llama.cpp's Gemma 2 "
                "graph fixes it"
            )

        if self.rope_type is not None:
            refuse(f"RoPE scaling {self.rope_type!r}")
        qpas = self.cfg.get("query_pre_attn_scalar", 256)
        if qpas != self.expected_query_scalar():
            refuse(f"query_pre_attn_scalar={qpas} (llama.cpp: {self.expected_query_scalar()})")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if not self.value(key):
                refuse(f"no {key} (llama.cpp always soft-caps)")
        expected = ["sliding" if i % 2 == 0 else "full" for i in range(self.n_layers)]
        if not self.value("sliding_window") or self.layer_types() != expected:
            refuse("a sliding-window pattern other than every even layer")
        if not self.tied:
            refuse("an output head apart from the embeddings (llama.cpp uses the embeddings)")

    def skip(self, hf_name: str) -> bool:
        return super().skip(hf_name) or hf_name == "lm_head.weight"

    def write_gguf_metadata(self, w: Any) -> None:
        # Gemma2Model.set_gguf_parameters (none of TextModel's keys but these)
        self.check_gguf()
        w.add_context_length(int(self.get("max_position_embeddings")))
        w.add_embedding_length(int(self.get("hidden_size")))
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(int(self.get("intermediate_size")))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(self.get("rms_norm_eps")))
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_attn_logit_softcapping(float(self.value("attn_logit_softcapping")))
        w.add_final_logit_softcapping(float(self.value("final_logit_softcapping")))
        w.add_sliding_window(int(self.value("sliding_window")))
        theta = self.rope.get("rope_theta")
        if theta is not None and float(theta) != LLAMA_ROPE_BASE:
            # The converter leaves the base out (llama.cpp then uses 10000): written when it
            # differs, which no released Gemma 2 does.
            w.add_rope_freq_base(float(theta))
        if self.folder is not None and (self.folder / "tokenizer.model").is_file():
            w.add_add_space_prefix(False)  # Gemma2Model.set_vocab (SentencePiece vocabulary)

    def changes_values(self, hf_name: str) -> bool:
        return hf_name.endswith("norm.weight")

    def rows_independent(self, hf_name: str) -> bool:
        return not self.changes_values(hf_name)

    def to_gguf(self, hf_name: str, t: Any) -> Any:
        if hf_name.endswith("norm.weight"):
            # HF's Gemma2RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored weight.
            return t.astype("float32") + 1.0 if hasattr(t, "astype") else t.float() + 1.0
        return t

    def from_gguf(self, hf_name: str, t: Any) -> Any:
        return t - 1.0 if hf_name.endswith("norm.weight") else t

    def gguf_config_extras(
        self, cfg: Any, gguf: Any, rope: dict[str, Any], key: Any, put: Any
    ) -> dict[str, Any]:
        rope = super().gguf_config_extras(cfg, gguf, rope, key, put)
        n_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        hd = int(key("attention.key_length") or cfg.head_dim)
        put("head_dim", hd)
        put(
            "query_pre_attn_scalar",
            hidden // int(cfg.num_attention_heads) if n_layers == N_LAYERS_27B else hd,
        )
        put("attn_logit_softcapping", float(key("attn_logit_softcapping", LLAMA_ATTN_SOFTCAP)))
        put("final_logit_softcapping", float(key("final_logit_softcapping", LLAMA_FINAL_SOFTCAP)))
        put("sliding_window", int(key("attention.sliding_window", LLAMA_WINDOW)))
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == n_layers:
            sliding = [bool(p) for p in pattern]
        else:  # llama.cpp's set_swa_pattern(2), or the period the file gives
            period = int(pattern) if isinstance(pattern, int) and pattern > 0 else 2
            sliding = [i % period < period - 1 for i in range(n_layers)]
        put("layer_types", ["sliding_attention" if s else "full_attention" for s in sliding])
        return rope
