"""Mixture-of-experts blocks for the layer runner: one ``nn.Linear`` per expert, router counts,
and every-token calibration; checkpoint reads through transformers' weight conversions.

transformers >= 5 builds an MoE layer's experts fused (``mlp.experts.gate_up_proj`` ``[E, 2F,
H]``, ``mlp.experts.down_proj`` ``[E, H, F]``) and loops over them with ``F.linear`` on slices:
no hook sees one expert's input. The runner therefore replaces each sparse block of the skeleton
with :class:`MoEBlock`, which computes the same function (the family's :class:`~qtool.models.
moe.MoESpec`: softmax over the router logits, top-k, optional renormalisation, optional shared
expert scaled by ``sigmoid`` of its gate) with one ``nn.Linear`` per expert projection, named
as the checkpoint names them (``block_sparse_moe.experts.3.w1``, ``mlp.experts.3.gate_proj``).
Statistics, the imatrix and GPTQ then see each expert's own routed tokens, and results carry the
checkpoint's names. The block also counts the tokens routed to each expert, and with
``all_experts`` runs *every* token through every expert (their statistics and Hessians see all
tokens) while only the routed ones reach the output, so the model computes what it computes
without it (llm-compressor's ``moe_calibrate_all_experts``).

:func:`conversion_reader` reads a parameter whatever the checkpoint's layout: transformers'
own checkpoint conversion mapping (``transformers.conversion_mapping``: ``WeightRenaming``,
``WeightConverter`` with ``MergeModulelist`` / ``Concatenate``) applied forwards builds a fused
in-memory parameter from per-expert tensors, and backwards slices one expert's projection out of
a fused tensor on disk.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtool.models.moe import MoESpec

# GPTQ: an expert whose Hessian saw fewer tokens than this is rounded to nearest instead
# (its Hessian would fit the few tokens it saw, not the inputs it will see); a warning names it.
MIN_EXPERT_TOKENS = 32


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class _Expert(nn.Module):
    def __init__(
        self,
        names: tuple[str, str, str],
        hidden: int,
        ff: int,
        act: str,
        *,
        bias: bool = False,
        limit: float | None = None,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self._names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, ff, bias=bias))
        self.add_module(up, nn.Linear(hidden, ff, bias=bias))
        self.add_module(down, nn.Linear(ff, hidden, bias=bias))
        self.act = _act(act)
        self.limit, self.alpha = limit, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        if self.limit is not None:  # gpt-oss: (clamp(up) + 1) * g * sigmoid(alpha * g)
            g = gate(x).clamp(max=self.limit)
            u = up(x).clamp(min=-self.limit, max=self.limit)
            return down((u + 1) * (g * torch.sigmoid(g * self.alpha)))
        return down(self.act(gate(x)) * up(x))


class MoEBlock(nn.Module):
    """A sparse MoE block with per-expert linears (see the module docstring)."""

    routed: torch.Tensor  # tokens routed to each expert (top-k), a buffer

    def __init__(self, spec: MoESpec) -> None:
        super().__init__()
        self.spec = spec
        self.add_module(spec.router, nn.Linear(spec.hidden, spec.n_expert, bias=spec.router_bias))
        self.experts = nn.ModuleList(
            _Expert(
                spec.projs,
                spec.hidden,
                spec.expert_ff,
                spec.act,
                bias=spec.expert_bias,
                limit=spec.swiglu_limit,
                alpha=spec.swiglu_alpha,
            )
            for _ in range(spec.n_expert)
        )
        if spec.shared_ff:
            shared = ("gate_proj", "up_proj", "down_proj")
            self.shared_expert = _Expert(shared, spec.hidden, spec.shared_ff, spec.act)
            self.shared_expert_gate = nn.Linear(spec.hidden, 1, bias=False)
        self.all_experts = False
        self.register_buffer("routed", torch.zeros(spec.n_expert, dtype=torch.int64))

    def forward(self, hidden: torch.Tensor) -> Any:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits = getattr(self, self.spec.router)(x)
        if self.spec.topk_softmax:  # gpt-oss: softmax over the top-k logits
            weights, index = torch.topk(logits, self.spec.top_k, dim=-1)
            weights = F.softmax(weights, dim=-1, dtype=weights.dtype)
        else:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            weights, index = torch.topk(probs, self.spec.top_k, dim=-1)
            if self.spec.norm_topk:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        scores = weights
        weights = weights.to(x.dtype)
        self.routed += torch.bincount(index.reshape(-1), minlength=self.spec.n_expert).to(
            self.routed.device
        )
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, pos = torch.where(index == e)
            if self.all_experts:
                y = expert(x)[token]
            elif token.numel() == 0:
                continue
            else:
                y = expert(x[token])
            out.index_add_(0, token, (y * weights[token, pos, None]).to(out.dtype))
        if self.spec.shared_ff:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.spec.returns_scores:  # gpt-oss's decoder layer unpacks (output, scores)
            return out.reshape(shape), scores
        return out.reshape(shape)


def install_moe_blocks(layers: nn.ModuleList, spec: MoESpec) -> int:
    """Replace every sparse block of ``layers`` by a :class:`MoEBlock` (built inside
    ``params_on_meta``) registered under the checkpoint's name; returns how many."""
    n = 0
    for layer in layers:
        old = getattr(layer, spec.attr, None)
        if old is None or not hasattr(old, "experts"):
            continue  # a dense layer
        block = MoEBlock(spec)
        del layer._modules[spec.attr]
        layer._modules[spec.block] = block
        if spec.block != spec.attr:  # the forward calls layer.mlp; the name stays the disk's
            object.__setattr__(layer, spec.attr, block)
        n += 1
    return n


def moe_blocks(module: nn.Module) -> list[MoEBlock]:
    return [m for m in module.modules() if isinstance(m, MoEBlock)]


def set_all_experts(module: nn.Module, on: bool) -> None:
    for b in moe_blocks(module):
        b.all_experts = on


def take_routed(module: nn.Module) -> list[int] | None:
    """Tokens routed to each expert of the (one) MoE block under ``module`` since the last call
    (each token counts once for each of its top-k experts); None for a dense layer."""
    blocks = moe_blocks(module)
    if not blocks:
        return None
    counts = blocks[0].routed.to("cpu").tolist()
    blocks[0].routed.zero_()
    return [int(c) for c in counts]


# -- reading through transformers' conversion mapping ---------------------------------------------


def _mapping(model_type: str) -> list[Any]:
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # an older transformers: checkpoints are read by their own names
        return []
    return (
        get_checkpoint_conversion_mapping(_MODEL_TO_CONVERSION_PATTERN.get(model_type, model_type))
        or []
    )


def _ops(conv: Any) -> list[tuple[str, int]]:
    return [(type(o).__name__, int(getattr(o, "dim", 0))) for o in conv.operations]


def conversion_reader(
    tensors: Any,
    read: Callable[[str], torch.Tensor],
    model_type: str,
    name: str,
    read_rows: Callable[[str, int, int], torch.Tensor] | None = None,
) -> Callable[[], torch.Tensor] | None:
    """How to read parameter ``name`` (the model's in-memory name) from a checkpoint holding
    ``tensors`` (names), through transformers' conversion mapping of ``model_type``:

    - renamings in reverse (Mixtral's ``.mlp.`` was ``.block_sparse_moe.`` on disk);
    - a fused parameter (``...experts.gate_up_proj``) from the per-expert tensors its converter
      lists (``MergeModulelist(dim)``: stack; ``Concatenate(dim)``: concatenate the stacks);
    - one expert's projection (``...experts.3.gate_proj.weight``) sliced from a fused tensor on
      disk (the converter run backwards).

    None when the mapping has no way to the tensor. ``read_rows(name, start, stop)``: the first
    dimension's rows ``start:stop`` alone, so one expert of a fused ``[E, ...]`` tensor is read
    without the others."""
    mapping = _mapping(model_type)
    renames = [
        (t.target_patterns[0], t.source_patterns[0])
        for t in mapping
        if type(t).__name__ == "WeightRenaming"
        and len(t.source_patterns) == len(t.target_patterns) == 1
    ]
    convs = [t for t in mapping if type(t).__name__ == "WeightConverter"]
    candidates = [name]
    for target, source in renames:  # in-memory name -> disk name (plain substrings)
        candidates += [c.replace(target, source) for c in candidates if target in c]
        candidates += [c.replace(source, target) for c in candidates if source in c]
    for cand in candidates:
        if cand in tensors:
            return partial(read, cand)
    for conv in convs:
        ops = _ops(conv)
        for cand in candidates:
            target = conv.target_patterns[0]
            if cand.endswith(target) and len(conv.target_patterns) == 1:  # fused <- per expert
                stem = cand[: -len(target)]
                lists = []
                for pat in conv.source_patterns:
                    found: list[str] = []
                    while (n := stem + pat.replace("*", str(len(found)))) in tensors:
                        found.append(n)  # experts are numbered from 0 without gaps
                    if not found:
                        break
                    lists.append(found)
                else:
                    return partial(_merge, read, lists, ops)
            for j, pat in enumerate(conv.source_patterns):  # one expert <- fused
                rx = re.escape(pat).replace(r"\*", r"(\d+)") + "$"
                m = re.search(rx, cand)
                if m is None:
                    continue
                fused = cand[: m.start()] + conv.target_patterns[0]
                for f in (fused, *(fused.replace(t, s) for t, s in renames)):
                    if f in tensors:
                        e, parts = int(m.group(1)), len(conv.source_patterns)
                        return partial(_read_slice, read, read_rows, f, e, j, parts, ops)
    return None


def _merge(read: Callable[[str], torch.Tensor], lists: list[list[str]], ops: list[Any]) -> Any:
    merged = [
        torch.stack([read(n) for n in names], dim=dict(ops).get("MergeModulelist", 0))
        for names in lists
    ]
    if len(merged) == 1:
        return merged[0]
    return torch.cat(merged, dim=dict(ops).get("Concatenate", 1))


def _read_slice(
    read: Callable[[str], torch.Tensor],
    read_rows: Callable[[str, int, int], torch.Tensor] | None,
    name: str,
    e: int,
    j: int,
    parts: int,
    ops: list[Any],
) -> torch.Tensor:
    if read_rows is not None and dict(ops).get("MergeModulelist", 0) == 0:
        return _slice(read_rows(name, e, e + 1), 0, j, parts, ops)  # expert e's rows only
    return _slice(read(name), e, j, parts, ops)


def _slice(fused: torch.Tensor, e: int, j: int, parts: int, ops: list[Any]) -> torch.Tensor:
    x = fused.select(dict(ops).get("MergeModulelist", 0), e)
    if parts > 1:  # Concatenate(dim) of the stacks: dim - 1 once the expert axis is gone
        x = x.chunk(parts, dim=dict(ops).get("Concatenate", 1) - 1)[j]
    return x.contiguous()
