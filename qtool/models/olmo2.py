"""OLMo 2 (llama.cpp arch ``olmo2``).

llama.cpp's converter (``conversion/olmo.py``, ``Olmo2Model``): tensors stored as they are (no
Q/K permutation: llama.cpp runs OLMo 2 with NeoX-style RoPE, HF's rotate-half layout), the
``TextModel`` hyper-parameters; a sliding window and its per-layer pattern only when the config
has one (OLMo 3). The layers normalise after attention and after the MLP
(``post_attention_layernorm`` -> ``post_attention_norm``, ``post_feedforward_layernorm`` ->
``post_ffw_norm``) and RMS-normalise the whole query and key projections (``q_norm``/``k_norm``
over all heads at once, ``attn_q_norm``/``attn_k_norm``).

No norm feeds the linears directly (the residual stream does), so SmoothQuant has nothing to
fold into; transformers has no GGUF reader for OLMo 2, so its GGUF files are not a source (qtool
reads GGUF sources as HF checkpoints).
"""

from __future__ import annotations

from typing import ClassVar

from qtool.errors import UnsupportedError
from qtool.models.base import Family


class Olmo2(Family):
    hf_types = ("olmo2",)
    gguf_arch = "olmo2"
    smooth_pairs: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()
    gguf_readable = False

    def check_gguf(self) -> None:
        super().check_gguf()
        if self.cfg.get("sliding_window") or any(t == "sliding" for t in self.layer_types()):
            raise UnsupportedError(
                "OLMo 2 with sliding-window layers (OLMo 3) is not supported for GGUF export"
            )
