"""IBM Granite 3.x dense models (llama.cpp arch ``granite``).

llama.cpp's converter (``conversion/granite.py``, ``GraniteModel``, a ``LlamaModel``): Llama's
layout (Q/K rows permuted, ``vocab_size`` and ``rope.dimension_count``), ``head_dim`` ignored,
and Granite's four multipliers written as llama.cpp's scales: ``attention_multiplier`` ->
``attention.scale`` (replaces ``1/sqrt(head_dim)``), ``embedding_multiplier`` ->
``embedding_scale``, ``residual_multiplier`` -> ``residual_scale`` (each block's output before
the residual add), ``logits_scaling`` -> ``logit_scale`` (logits divided by it). Each is written
only when set (not 0), as the converter does.

transformers has no GGUF reader for Granite, so its GGUF files are not a source (qtool
reads GGUF sources as HF checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qtool.errors import UnsupportedError
from qtool.models.llama import Llama


class Granite(Llama):
    hf_types = ("granite",)
    gguf_arch = "granite"
    gguf_readable = False

    def __init__(self, config: Mapping[str, Any], folder: Path | None = None) -> None:
        super().__init__(config, folder)
        # The converter drops head_dim (llama.cpp's Granite takes hidden / heads): harmless
        # when they agree, refused by check_gguf when they do not.
        hd = self.cfg.get("head_dim")
        if hd is not None and int(hd) == int(self.get("hidden_size")) // self.n_head:
            self.cfg.pop("head_dim")

    def check_gguf(self) -> None:
        super().check_gguf()
        if self.cfg.get("head_dim") is not None:
            raise UnsupportedError(
                f"Granite with head_dim {self.cfg['head_dim']} != hidden/heads: llama.cpp's "
                "Granite derives the head size from the hidden size"
            )

    def write_gguf_metadata(self, w: Any) -> None:
        super().write_gguf_metadata(w)
        if scale := self.cfg.get("attention_multiplier"):
            w.add_attention_scale(float(scale))
        if scale := self.cfg.get("embedding_multiplier"):
            w.add_embedding_scale(float(scale))
        if scale := self.cfg.get("residual_multiplier"):
            w.add_residual_scale(float(scale))
        if scale := self.cfg.get("logits_scaling"):
            w.add_logit_scale(float(scale))
