"""Per-tensor GGUF type policy: which type each tensor gets under a llama-quantize preset.

This reproduces llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) for the presets qtool
writes, so that qtool's files, and the footprint report, hold the types llama-quantize would
pick. Everything per-tensor lives here: what may be quantized at all, the preset mixes (which
layers get more bits), output/embedding rules, user overrides, and the row-length fallbacks.

The mixes, as a table (``more_bits(i, n)`` is ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``):

    preset   default  attn_v                         ffn_down                      attn_output
    Q2_K     Q2_K     Q4_K if gqa>=4 else Q3_K       Q3_K                          Q3_K
    Q3_K_S   Q3_K     -                              -                             -
    Q3_K_M   Q3_K     Q5_K for the first 2, else Q4_K  Q5_K if i<n/16 else Q4_K    Q4_K
    Q3_K_L   Q3_K     Q5_K                           Q5_K                          Q5_K
    Q4_K_S   Q4_K     Q5_K for the first 4           Q5_K if i<n/8                 -
    Q4_K_M   Q4_K     Q6_K if more_bits              Q6_K if more_bits             -
    Q5_K_S   Q5_K     -                              -                             -
    Q5_K_M   Q5_K     Q6_K if more_bits              Q6_K if more_bits             -
    Q4_0/Q5_0 with an imatrix: ffn_down Q4_1/Q5_1 for i < n/8.
    MXFP4_MOE: 3-D tensors of more than one matrix (MoE experts) MXFP4, all others Q8_0
               (output.weight too).

``i`` counts ffn_down tensors in llama.cpp's order, except in MoE models (``n_expert > 1``),
where it is the block number in the name (``layer_info``), so ``ffn_down_exps`` and a shared
expert's ``ffn_down_shexp`` of one layer get the same choice. 8-expert models (Mixtral) put
attn_v and attn_k in Q8_0 and attn_output in Q5_K for the Q2_K..Q4_K_M mixes. The router
(``ffn_gate_inp``) is never quantized, nor a tensor that is 1-D in ggml's count
(``ffn_gate_inp_shexp``, stored ``(1, n)``).

``output.weight`` (and ``token_embd.weight`` when the embeddings are tied) gets Q6_K unless the
preset is Q8_0 or the row does not divide into 256 (then Q8_0); TQ1_0/TQ2_0 give the token
embeddings Q4_K. Tensors that may not be quantized (1-D, norms) keep their source type.
A row length that a type's block does not divide falls back: Q2_K/Q3_K/TQ* -> Q4_0,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 if the 32-block still does not divide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qtool.kernels.types import get_type

FLOAT_TYPES = ("F32", "F16", "BF16")

# preset -> (default type, llama_ftype id as stored in general.file_type)
PRESETS: dict[str, tuple[str, int]] = {
    "F32": ("F32", 0),
    "F16": ("F16", 1),
    "BF16": ("BF16", 32),
    "Q4_0": ("Q4_0", 2),
    "Q4_1": ("Q4_1", 3),
    "Q8_0": ("Q8_0", 7),
    "Q5_0": ("Q5_0", 8),
    "Q5_1": ("Q5_1", 9),
    "Q2_K": ("Q2_K", 10),
    "Q3_K_S": ("Q3_K", 11),
    "Q3_K_M": ("Q3_K", 12),
    "Q3_K_L": ("Q3_K", 13),
    "Q4_K_S": ("Q4_K", 14),
    "Q4_K_M": ("Q4_K", 15),
    "Q5_K_S": ("Q5_K", 16),
    "Q5_K_M": ("Q5_K", 17),
    "Q6_K": ("Q6_K", 18),
    "TQ1_0": ("TQ1_0", 36),
    "TQ2_0": ("TQ2_0", 37),
    "MXFP4_MOE": ("MXFP4", 38),
}
# llama-quantize's short names for the k-quant mixes.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# Row-length fallbacks (llama.cpp tensor_type_fallback).
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def resolve_preset(name: str) -> str:
    """Canonical preset name, with an error listing the valid ones."""
    key = name.upper()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown type or preset {name!r}; choose one of {', '.join(PRESETS)}")
    return key


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order (weight_name_comparer): by block number, then by name."""

    def key(name: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(names, key=key)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for cat in (
        "attn_qkv.weight",
        "attn_kv_b.weight",
        "attn_v.weight",
        "attn_k.weight",
        "attn_q.weight",
        "attn_output.weight",
    ):
        if cat in name:
            return cat.removesuffix(".weight")
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat
    return "other"


def allows_quantization(name: str, ndim: int) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors of the supported archs."""
    if ndim < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    skip = (
        "ffn_gate_inp.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "position_embd",
        "token_types",
        "ssm_conv1d",
        "attn_rel_b.weight",
    )
    return not any(s in name for s in skip)


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml's ``ggml_n_dims``: dimensions up to the last one above 1, in ggml order (PyTorch's
    reversed), so a ``(1, n)`` tensor such as Qwen2-MoE's shared-expert gate is 1-D."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


@dataclass(frozen=True)
class ModelFacts:
    """What the policy needs to know about the model besides tensor names."""

    n_layers: int
    n_gqa: int = 1
    n_expert: int = 0
    is_70b: bool = False
    is_falcon: bool = False


def facts_for(family: Any) -> ModelFacts:
    """The facts of a model family (:class:`qtool.models.Family`) the type choices depend on."""
    n_gqa = family.n_head // max(1, family.n_head_kv)
    return ModelFacts(
        n_layers=family.n_layers,
        n_gqa=n_gqa,
        n_expert=int(family.get("num_local_experts", "num_experts", default=0) or 0),
        is_70b=family.gguf_arch == "llama" and family.n_layers == 80 and n_gqa > 1,
    )


def fallback(name: str, n_cols: int, qtype: str) -> str:
    """The type llama.cpp uses when ``qtype``'s block does not divide the row length."""
    if get_type(qtype).block_size == 1 or n_cols % get_type(qtype).block_size == 0:
        return qtype
    new = FALLBACK.get(qtype, qtype)
    if n_cols % get_type(new).block_size:
        new = "F16"
    return new


def plan_types(
    tensors: Sequence[tuple[str, tuple[int, ...], str]],
    preset: str,
    facts: ModelFacts,
    *,
    overrides: Sequence[tuple[str, str]] = (),
    output_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    has_imatrix: bool = False,
) -> dict[str, str]:
    """Choose each tensor's GGUF type.

    ``tensors``: (gguf name, shape in PyTorch order, source type) for every tensor; the row
    length llama.cpp checks (``ne[0]``) is the last dimension. Returns name -> type name.
    ``overrides`` are (regex, type) pairs searched in order, as ``--tensor-type`` does.
    """
    preset = resolve_preset(preset)
    default, _ = PRESETS[preset]
    names = llama_order(t[0] for t in tensors)
    info = {t[0]: t for t in tensors}
    tied = "output.weight" not in info
    n_attn_v = sum(1 for n in names if category(n) in ("attn_v", "attn_qkv", "attn_kv_b"))
    state = {"attn_v": 0, "ffn_down": 0}
    patterns = [(re.compile(p), get_type(t).name) for p, t in overrides]
    out: dict[str, str] = {}
    for name in names:
        _, shape, src_type = info[name]
        cat = category(name)
        if not allows_quantization(name, ggml_n_dims(shape)):
            out[name] = src_type
            continue
        if token_embedding_type and cat == "token_embd":
            out[name] = get_type(token_embedding_type).name
            continue
        if output_type and cat == "output":
            out[name] = get_type(output_type).name
            continue
        new = default
        if default not in FLOAT_TYPES:
            manual = False
            for pattern, qtype in patterns:
                if pattern.search(name):
                    new, manual = qtype, True
                    break
            if not manual and not pure:
                new = _mix(
                    name,
                    cat,
                    shape,
                    new,
                    preset,
                    facts,
                    tied,
                    n_attn_v,
                    state,
                    has_imatrix,
                    output_type,
                    token_embedding_type,
                )
            new = fallback(name, shape[-1], new)
        out[name] = new
    return out


def _mix(
    name: str,
    cat: str,
    shape: tuple[int, ...],
    new: str,
    preset: str,
    facts: ModelFacts,
    tied: bool,
    n_attn_v: int,
    state: dict[str, int],
    has_imatrix: bool,
    output_type: str | None,
    token_embedding_type: str | None,
) -> str:
    """llama_tensor_get_type_impl for the k-quant, legacy and MXFP4_MOE presets."""
    n = facts.n_layers
    if preset == "MXFP4_MOE":  # experts (ne[2] > 1) MXFP4, the rest Q8_0
        if cat == "output" or (tied and cat == "token_embd"):
            return get_type(output_type).name if output_type else "Q8_0"
        return "MXFP4" if len(shape) == 3 and shape[0] > 1 else "Q8_0"
    if cat == "output" or (tied and cat == "token_embd"):
        if output_type:
            return get_type(output_type).name
        if facts.is_falcon or shape[-1] % get_type(new).block_size:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        if token_embedding_type:
            return get_type(token_embedding_type).name
        return "Q4_K" if preset in ("TQ1_0", "TQ2_0") else new
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i = state["attn_v"]
        if preset == "Q2_K":
            new = "Q4_K" if facts.n_gqa >= 4 else "Q3_K"
        elif preset == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif preset == "Q3_K_L":
            new = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and more_bits(i, n_attn_v):
            new = "Q6_K"
        elif preset == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if facts.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if facts.n_expert == 8:
            new = "Q8_0"
        state["attn_v"] += 1
        return new
    if cat == "attn_k":
        return "Q8_0" if facts.n_expert == 8 else new
    if cat == "ffn_down":
        i = state["ffn_down"]
        if facts.n_expert > 1:  # layer_info: MoE models number ffn_down by the name's block
            m = re.match(r"blk\.(\d+)\.", name)
            i = int(m.group(1)) if m else i
        if preset == "Q2_K":
            new = "Q3_K"
        elif preset == "Q3_K_M":
            if i < n // 16:
                new = "Q5_K"
            elif not facts.is_falcon or more_bits(i, n):
                new = "Q4_K"
        elif preset == "Q3_K_L":
            new = "Q4_K" if facts.is_falcon else "Q5_K"
        elif preset == "Q4_K_M":
            if facts.is_falcon:
                new = "Q6_K" if i < n // 16 else "Q5_K" if more_bits(i, n) else "Q4_K"
            elif more_bits(i, n):
                new = "Q6_K"
        elif preset == "Q5_K_M" and more_bits(i, n):
            new = "Q6_K"
        elif preset == "Q4_K_S" and not facts.is_falcon and i < n // 8:
            new = "Q5_K"
        elif preset in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            new = "Q4_1" if preset == "Q4_0" else "Q5_1"
        state["ffn_down"] += 1
        return new
    if cat == "attn_output":
        if facts.is_falcon:
            return "Q4_K" if preset == "Q3_K_L" else new
        if facts.n_expert == 8:
            mixes = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
            return "Q5_K" if preset in mixes else new
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, new)
    return new
