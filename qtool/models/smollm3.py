"""SmolLM3 (llama.cpp arch ``smollm3``).

llama.cpp's converter (``conversion/llama.py``, ``SmolLM3Model``, a ``LlamaModel``): Llama's
layout and keys (Q/K rows permuted, ``vocab_size``, ``rope.dimension_count``), nothing else.
Which layers skip RoPE is not in the file: llama.cpp's SmolLM3 graph hard-codes every 4th layer
(``n_no_rope_layer_step = 4``: layer ``i`` uses RoPE iff ``(i + 1) % 4 != 0``), which is
transformers' default ``no_rope_layers`` for ``no_rope_layer_interval: 4`` and what SmolLM3-3B
ships; any other pattern, or sliding-window layers (llama.cpp's SmolLM3 has none), is refused.

transformers has no GGUF reader for SmolLM3, so its GGUF files are not a source (qtool
reads GGUF sources as HF checkpoints).
"""

from __future__ import annotations

from qtool.errors import UnsupportedError
from qtool.models.llama import Llama

LLAMA_NO_ROPE_STEP = 4


class SmolLM3(Llama):
    hf_types = ("smollm3",)
    gguf_arch = "smollm3"
    gguf_readable = False

    def rope_layers(self) -> list[int]:
        """1 where a layer applies RoPE (transformers' ``no_rope_layers``)."""
        given = self.cfg.get("no_rope_layers")
        if given is not None:
            return [int(x) for x in given]
        step = int(self.cfg.get("no_rope_layer_interval") or LLAMA_NO_ROPE_STEP)
        return [int((i + 1) % step != 0) for i in range(self.n_layers)]

    def check_gguf(self) -> None:
        super().check_gguf()
        expected = [int((i + 1) % LLAMA_NO_ROPE_STEP != 0) for i in range(self.n_layers)]
        if self.rope_layers() != expected:
            raise UnsupportedError(
                "SmolLM3 with RoPE skipped on layers other than every 4th cannot be exported "
                "faithfully: llama.cpp's SmolLM3 hard-codes every 4th layer",
            )
        if self.cfg.get("use_sliding_window") or any(t == "sliding" for t in self.layer_types()):
            raise UnsupportedError(
                "SmolLM3 with sliding-window layers cannot be exported: llama.cpp's SmolLM3 "
                "has none"
            )
