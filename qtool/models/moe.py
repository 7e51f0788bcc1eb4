"""Mixture-of-experts families: what Mixtral, Qwen2-MoE and Qwen3-MoE share.

Checkpoints keep one tensor per expert (``model.layers.N.mlp.experts.E.gate_proj.weight``,
Mixtral ``...block_sparse_moe.experts.E.w1.weight``); some writers store them fused
(``mlp.experts.gate_up_proj`` ``[E, 2F, H]`` and ``mlp.experts.down_proj`` ``[E, H, F]``, the
layout transformers >= 5 builds in memory). llama.cpp stacks them into one 3-D tensor per layer
and projection (``convert_hf_to_gguf.py``: ``LlamaModel.modify_tensors`` for Mixtral,
``Qwen2MoeModel.modify_tensors``): ``blk.N.ffn_{gate,up,down}_exps.weight`` of PyTorch shape
``[E, rows, cols]``, expert-major. Here that is a merged :class:`GGUFTensor` whose ``build``
yields one expert at a time, so export holds one expert's rows, never the whole stack.

The router (``ffn_gate_inp``) and Qwen2-MoE's shared-expert gate (``ffn_gate_inp_shexp``) stay
F32 whatever the preset, as the converter writes them and llama-quantize leaves them.
Hyper-parameters added to the dense keys: ``expert_count``, ``expert_used_count`` and, for the
Qwen MoE archs, ``expert_feed_forward_length`` and ``expert_shared_feed_forward_length``
(``TextModel.set_gguf_parameters`` / ``Qwen2MoeModel.set_gguf_parameters``).

:class:`MoESpec` tells the layer runner how the block routes (top-k softmax, renormalised or
not, shared expert) and how its tensors are named on disk, so it can run one ``nn.Linear`` per
expert (:mod:`qtool.runner.moe`): statistics, imatrix and GPTQ then see each expert's own
inputs. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from qtool.errors import UnsupportedError
from qtool.models.base import Family, GGUFTensor

# one expert's projection, as checkpoints store it
_EXPERT = re.compile(
    r"^(?P<pre>(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>\w+)\.experts)\.(?P<expert>\d+)\."
    r"(?P<proj>\w+)\.weight$"
)
# every expert of a layer in one tensor (transformers >= 5's in-memory layout)
_FUSED = re.compile(
    r"^(?P<pre>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)"
    r"(?:\.weight)?$"
)


@dataclass(frozen=True)
class MoESpec:
    """How one sparse MoE block computes, and its tensors' names on disk."""

    n_expert: int
    top_k: int
    norm_topk: bool  # renormalise the top-k probabilities to sum to 1
    block: str  # the block's name in the checkpoint ("mlp", Mixtral "block_sparse_moe")
    attr: str  # the attribute transformers' decoder layer calls ("mlp")
    projs: tuple[str, str, str]  # gate, up, down projection names on disk
    expert_ff: int
    hidden: int
    act: str
    shared_ff: int = 0  # Qwen2-MoE's always-on shared expert (0: none)
    # gpt-oss: the router's name and bias, biased expert projections, top-k of the logits
    # then softmax over them, the clamped SwiGLU, and a block returning (output, router scores)
    router: str = "gate"
    router_bias: bool = False
    expert_bias: bool = False
    topk_softmax: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    returns_scores: bool = False


@dataclass(frozen=True)
class ExpertRef:
    """One expert's projection: its merged GGUF tensor and its index in it."""

    layer: int
    expert: int
    role: str  # "gate", "up", "down"
    gguf: str


class MoEFamily(Family):
    """Base of the sparse-MoE families (a mixin over a dense family's conventions)."""

    moe_block: ClassVar[str] = "mlp"
    moe_projs: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    # HF module names (in the decoder layer) of what routes, never quantized
    router_names: ClassVar[tuple[str, ...]] = ("mlp.gate", "mlp.shared_expert_gate")

    # -- config ---------------------------------------------------------------------------------

    @property
    def n_expert(self) -> int:
        return int(self.get("num_local_experts", "num_experts", default=0))

    @property
    def n_expert_used(self) -> int:
        return int(self.get("num_experts_per_tok", default=0))

    @property
    def expert_ff(self) -> int:
        return int(self.get("moe_intermediate_size", "intermediate_size"))

    @property
    def shared_ff(self) -> int:
        return int(self.get("shared_expert_intermediate_size", default=0) or 0)

    @property
    def norm_topk(self) -> bool:
        return bool(self.get("norm_topk_prob", default=False))

    def moe_spec(self) -> MoESpec | None:
        return MoESpec(
            n_expert=self.n_expert,
            top_k=self.n_expert_used,
            norm_topk=self.norm_topk,
            block=self.moe_block,
            attr="mlp",
            projs=self.moe_projs,
            expert_ff=self.expert_ff,
            hidden=int(self.get("hidden_size")),
            act=str(self.get("hidden_act", default="silu")),
            shared_ff=self.shared_ff,
        )

    def check_moe(self) -> None:
        """Refuse configs whose layers are not all sparse (llama.cpp's MoE archs have none)."""
        if self.get("mlp_only_layers") or int(self.get("decoder_sparse_step", default=1)) != 1:
            raise UnsupportedError(
                f"{self.model_type}: dense MLP layers among the MoE layers (mlp_only_layers / "
                "decoder_sparse_step) are not supported",
                hint="llama.cpp's MoE architectures expect every layer sparse",
            )
        if self.n_expert < 2 or not 0 < self.n_expert_used <= self.n_expert:
            raise UnsupportedError(
                f"{self.model_type}: {self.n_expert} experts, {self.n_expert_used} used per token"
            )

    def check_gguf(self) -> None:
        super().check_gguf()
        self.check_moe()

    # -- names -----------------------------------------------------------------------------------

    def _role(self, proj: str) -> str | None:
        gate, up, down = self.moe_projs
        return {gate: "gate", up: "up", down: "down"}.get(proj)

    def expert_of(self, hf_name: str) -> ExpertRef | None:
        """The expert a per-expert HF tensor (or linear module) belongs to, else None."""
        name = hf_name if hf_name.endswith(".weight") else hf_name + ".weight"
        m = _EXPERT.match(name)
        if m is None or m["block"] != self.moe_block:
            return None
        role = self._role(m["proj"])
        if role is None:
            return None
        layer = int(m["layer"])
        return ExpertRef(layer, int(m["expert"]), role, f"blk.{layer}.ffn_{role}_exps.weight")

    def gguf_name(self, hf_name: str) -> str | None:
        ref = self.expert_of(hf_name)
        if ref is not None:  # one expert of a merged tensor
            return ref.gguf
        m = _FUSED.match(hf_name)
        if m is not None:
            role = "down" if m["proj"] == "down_proj" else "gate"  # gate_up -> two tensors
            return f"blk.{m['layer']}.ffn_{role}_exps.weight"
        return super().gguf_name(hf_name)

    def is_router(self, name: str) -> bool:
        stem = name.removesuffix(".weight")
        return any(stem.endswith("." + r) for r in self._router_names()) or ("ffn_gate_inp" in name)

    def _router_names(self) -> tuple[str, ...]:
        return tuple(r.replace("mlp.", f"{self.moe_block}.", 1) for r in self.router_names) + (
            self.router_names
        )

    def is_linear(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.is_router(name):
            return False
        return super().is_linear(name, shape)

    # -- GGUF ------------------------------------------------------------------------------------

    def write_gguf_metadata(self, w: Any) -> None:
        super().write_gguf_metadata(w)
        w.add_expert_count(self.n_expert)
        w.add_expert_used_count(self.n_expert_used)

    def gguf_tensors(self, tensors: Mapping[str, Any]) -> list[GGUFTensor]:
        experts: dict[str, dict[int, str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        fused: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for name, info in tensors.items():
            ref = self.expert_of(name)
            if ref is not None:
                experts.setdefault(ref.gguf, {})[ref.expert] = name
                shapes[ref.gguf] = tuple(info.shape)
            elif _FUSED.match(name):
                fused[name] = info
            else:
                rest[name] = info
        out = [  # routers stay F32, as the converter writes them
            dataclasses.replace(t, float_only=True) if self.is_router(t.hf_name or "") else t
            for t in super().gguf_tensors(rest)
        ]
        for g, by_index in sorted(experts.items()):
            if sorted(by_index) != list(range(self.n_expert)):
                missing = sorted(set(range(self.n_expert)) - set(by_index))
                raise UnsupportedError(
                    f"{g}: the checkpoint lacks experts {missing[:8]} of {self.n_expert}",
                    hint="is the checkpoint complete?",
                )
            sources = tuple(by_index[e] for e in range(self.n_expert))
            out.append(GGUFTensor(g, (self.n_expert, *shapes[g]), sources, _stack_experts))
        for name, info in fused.items():
            out.extend(self._fused_tensors(name, tuple(info.shape)))
        return out

    def _fused_tensors(self, name: str, shape: tuple[int, ...]) -> list[GGUFTensor]:
        """A fused ``[E, 2F, H]`` gate_up (split in two, gate first) or ``[E, H, F]`` down."""
        m = _FUSED.match(name)
        assert m is not None
        layer = m["layer"]
        if m["proj"] == "down_proj":
            return [GGUFTensor(f"blk.{layer}.ffn_down_exps.weight", shape, (name,), _by_expert())]
        e, two_f, h = shape
        f = two_f // 2
        return [
            GGUFTensor(f"blk.{layer}.ffn_{role}_exps.weight", (e, f, h), (name,), _by_expert(part))
            for part, role in enumerate(("gate", "up"))
        ]


def _stack_experts(arrays: Sequence[Any]) -> Iterator[Any]:
    """Merged expert tensor, one expert's rows at a time (``arrays`` reads lazily)."""
    for i in range(len(arrays)):
        yield arrays[i]


def _by_expert(part: int | None = None) -> Any:
    def build(arrays: Sequence[Any]) -> Iterator[Any]:
        fused = arrays[0]
        for e in range(fused.shape[0]):
            x = fused[e]
            if part is not None:
                f = x.shape[0] // 2
                x = x[part * f : (part + 1) * f]
            yield x

    return build
