"""Mixtral (llama.cpp arch ``llama`` with experts): Llama's attention (Q/K rows permuted as for
Llama) and a sparse MoE block stored as ``block_sparse_moe.gate`` (the router) and
``block_sparse_moe.experts.E.{w1,w3,w2}`` (gate, up, down), merged into ``ffn_*_exps`` as
``convert_hf_to_gguf.py``'s ``LlamaModel.modify_tensors`` does. Top-k softmax, always
renormalised over the chosen experts (transformers' ``MixtralTopKRouter``)."""

from __future__ import annotations

from typing import ClassVar

from qtool.models.llama import Llama
from qtool.models.moe import MoEFamily


class Mixtral(MoEFamily, Llama):
    hf_types = ("mixtral",)  # type: ignore[assignment]
    gguf_arch = "llama"
    moe_block: ClassVar[str] = "block_sparse_moe"
    moe_projs: ClassVar[tuple[str, str, str]] = ("w1", "w3", "w2")

    @property
    def norm_topk(self) -> bool:
        return True
