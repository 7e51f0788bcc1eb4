"""Qwen2-MoE and Qwen3-MoE (llama.cpp arches ``qwen2moe``, ``qwen3moe``): experts under
``mlp.experts.E.{gate,up,down}_proj``, the router ``mlp.gate``; Qwen2-MoE adds an always-on
shared expert (``mlp.shared_expert.*`` -> ``ffn_*_shexp``) scaled by ``sigmoid`` of its own
gate (``mlp.shared_expert_gate`` -> ``ffn_gate_inp_shexp``, kept F32). Qwen3-MoE has Qwen 3's
per-head q/k norms and no shared expert. ``norm_topk_prob`` says whether the top-k
probabilities are renormalised (``convert_hf_to_gguf.py``: ``Qwen2MoeModel``,
``Qwen3MoeModel``; llama.cpp renormalises for qwen3moe always, as every released Qwen3-MoE
sets ``norm_topk_prob: true``)."""

from __future__ import annotations

from typing import Any

from qtool.errors import UnsupportedError
from qtool.models.moe import MoEFamily
from qtool.models.qwen import Qwen3


class Qwen2Moe(MoEFamily):
    hf_types = ("qwen2_moe",)
    gguf_arch = "qwen2moe"

    def write_gguf_metadata(self, w: Any) -> None:
        super().write_gguf_metadata(w)
        if self.get("moe_intermediate_size") is not None:
            w.add_expert_feed_forward_length(int(self.get("moe_intermediate_size")))
        if self.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(
                int(self.get("shared_expert_intermediate_size"))
            )

    def check_moe(self) -> None:
        super().check_moe()
        if self.norm_topk:  # llama.cpp's qwen2moe graph never renormalises
            raise UnsupportedError(
                "qwen2_moe with norm_topk_prob: true: llama.cpp's qwen2moe does not renormalise "
                "the top-k weights, so its GGUF would compute another model"
            )


class Qwen3Moe(Qwen2Moe, Qwen3):
    hf_types = ("qwen3_moe",)
    gguf_arch = "qwen3moe"

    def check_moe(self) -> None:
        MoEFamily.check_moe(self)
        if not self.norm_topk:  # llama.cpp's qwen3moe graph always renormalises
            raise UnsupportedError(
                "qwen3_moe with norm_topk_prob: false: llama.cpp's qwen3moe renormalises the "
                "top-k weights, so its GGUF would compute another model"
            )
