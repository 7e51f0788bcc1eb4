"""The memory-footprint report: weights in every format, KV cache, activations, training, GPUs.

Sizes come from the model's actual tensor shapes, never from a bits-per-weight average:
each GGUF preset applies llama.cpp's per-tensor type policy (``qtool.policy``), including the
row-length fallbacks, and each GPTQ / INT8 layout counts its scales, zero-points and g_idx.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from qtool.checkpoint import Checkpoint
from qtool.kernels.types import get_type
from qtool.models import Family, family_for
from qtool.models.spec import ModelSpec, component
from qtool.policy import facts_for, plan_types

GIB = 2**30
# Reserve per GPU for the CUDA context, allocator slack and fragmentation.
GPU_RESERVE_BYTES = 1 * GIB
DEFAULT_GPU_SIZES_GB = (24, 40, 80)
# The weight formats the report lists, in order.
GGUF_PRESETS_REPORTED = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "TQ2_0")
DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "f32": 4,
    "float16": 2,
    "fp16": 2,
    "f16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "fp8": 1,
    "float8": 1,
    "q8_0": 34 / 32,
}


@dataclass(frozen=True)
class Tensor:
    """A tensor as the report sees it: its name in the checkpoint, llama.cpp name, shape, and
    whether it is a decoder linear (what GPTQ / INT8 formats quantize: the family's
    :meth:`~qtool.models.Family.is_linear`)."""

    name: str
    gguf: str
    shape: tuple[int, ...]
    is_linear: bool = False
    is_expert: bool = False  # one routed expert's weight (MoE)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class FormatSize:
    format: str
    bytes: int
    bits_per_weight: float  # all bytes (incl. scales, mins, zero-points, g_idx) * 8 / params
    types: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensor count
    note: str = ""
    expert_bytes: int = 0  # of ``bytes``, the routed experts' (MoE)


def model_tensors(ckpt: Checkpoint, spec: ModelSpec) -> list[Tensor]:
    """The checkpoint's tensors with llama.cpp names; a tied lm_head is counted once. Shapes
    are the parameters' (:meth:`~qtool.models.Family.stored_params`: packed MXFP4 codes count two
    a byte, their scales are no parameters)."""
    out = []
    family = family_for(ckpt.config, strict=False)
    for info in ckpt.tensors.values():
        g = family.gguf_name(info.name) or info.name
        if spec.tied_embeddings and g == "output.weight":
            continue  # stored twice by some checkpoints; tied weights are one parameter
        for gguf_name, shape in family.stored_params(info.name, info.shape):
            out.append(
                Tensor(
                    info.name,
                    gguf_name,
                    shape,
                    family.is_linear(info.name, shape),
                    family.holds_experts(info.name),
                )
            )
    return out


def weight_formats(tensors: Sequence[Tensor], family: Family) -> list[FormatSize]:
    n_params = sum(t.numel for t in tensors)

    experts = [t for t in tensors if t.is_expert]

    def fmt(name: str, size: Callable[[Tensor], float], **kw: object) -> FormatSize:
        nb = int(math.ceil(sum(size(t) for t in tensors)))
        eb = int(math.ceil(sum(size(t) for t in experts)))
        return FormatSize(name, nb, 8 * nb / n_params, expert_bytes=eb, **kw)  # type: ignore[arg-type]

    rows = [
        fmt("FP32", lambda t: 4 * t.numel),
        fmt("FP16", lambda t: 2 * t.numel),
        fmt("BF16", lambda t: 2 * t.numel),
        fmt(
            "INT8 per-channel",
            lambda t: t.numel + 2 * t.shape[0] if t.is_linear else 2 * t.numel,
            note="int8 weights + one 16-bit scale per output channel; other tensors 16-bit",
        ),
    ]
    for preset in GGUF_PRESETS_REPORTED + (("MXFP4_MOE",) if experts else ()):
        rows.append(gguf_size(tensors, family, preset))
    for bits in (4, 3):
        rows.append(
            fmt(
                f"GPTQ {bits}-bit g128",
                lambda t, b=bits: gptq_bytes(t, b, 128),  # type: ignore[misc]
                note="qweight + qzeros + fp16 scales + g_idx; other tensors fp16",
            )
        )
    return rows


def gguf_size(tensors: Sequence[Tensor], family: Family, preset: str) -> FormatSize:
    """Bytes of a GGUF file's tensor data under ``preset`` as llama-quantize would type it,
    from an F16 conversion (1-D tensors stay F32, as llama.cpp's converter writes them)."""
    facts = facts_for(family)
    # one entry per GGUF tensor: a MoE layer's experts are one merged tensor (same type), 3-D
    entries: dict[str, tuple[str, tuple[int, ...], str]] = {}
    n_merged: dict[str, int] = {}
    for t in tensors:
        # F32 as the converter writes them: 1-D tensors, routers, biases
        f32 = len(t.shape) == 1 or "ffn_gate_inp" in t.gguf or not t.gguf.endswith(".weight")
        entries.setdefault(t.gguf, (t.gguf, t.shape, "F32" if f32 else "F16"))
        n_merged[t.gguf] = n_merged.get(t.gguf, 0) + (1 if t.is_expert and len(t.shape) == 2 else 0)
    for g, n in n_merged.items():
        if n > 1:  # one 2-D tensor per expert on disk
            name, shape, st = entries[g]
            entries[g] = (name, (n, *shape), st)
    types = plan_types(list(entries.values()), preset, facts)
    total = experts = 0
    counts: dict[str, int] = {}
    for t in tensors:
        q = get_type(types[t.gguf])
        nb = t.numel // q.block_size * q.type_size
        total += nb
        experts += nb if t.is_expert else 0
    for g in entries:
        q = get_type(types[g])
        counts[q.name] = counts.get(q.name, 0) + 1
    n_params = sum(t.numel for t in tensors)
    return FormatSize(
        preset,
        total,
        8 * total / n_params,
        types=counts,
        note="tensor data; metadata and tokenizer add a few MB",
        expert_bytes=experts,
    )


def gptq_bytes(t: Tensor, bits: int, group: int) -> int:
    """Bytes of one tensor in the GPTQ v1 layout (AutoGPTQ / GPTQModel)."""
    if not t.is_linear:
        return 2 * t.numel
    out_f, in_f = t.shape
    groups = math.ceil(in_f / group)
    qweight = math.ceil(in_f * bits / 32) * out_f * 4  # int32 [in*bits/32, out]
    qzeros = groups * math.ceil(out_f * bits / 32) * 4  # int32 [groups, out*bits/32]
    scales = groups * out_f * 2  # fp16 [groups, out]
    g_idx = in_f * 4  # int32 [in]
    return qweight + qzeros + scales + g_idx


# --------------------------------------------------------------------------------------------
# runtime and training
# --------------------------------------------------------------------------------------------


def kv_cache_bytes(spec: ModelSpec, context: int, batch: int, dtype_bytes: float) -> int:
    """Keys and values for every layer. A sliding-window layer keeps the last ``window - 1``
    tokens (the current token completes the window), as transformers' cache does."""
    per_token = 2 * spec.n_kv_heads * spec.head_dim * dtype_bytes
    total = 0.0
    for kind in spec.layer_types:
        tokens = context
        if kind == "sliding" and spec.sliding_window:
            tokens = min(context, spec.sliding_window - 1)
        total += per_token * tokens * batch
    return int(total)


def activation_bytes(spec: ModelSpec, context: int, batch: int, chunk: int = 512) -> int:
    """Transient inference activations, stated as a formula (fp32 working buffers):
    prefill runs in chunks of ``chunk`` tokens (llama.cpp's ubatch, 512): per chunk the
    residual stream and attention/MLP intermediates, chunk * (4*hidden + 3*intermediate) * 4 B,
    plus attention scores heads * chunk * context * 4 B, plus the logits batch * vocab * 4 B."""
    c = min(chunk, context)
    inter = spec.intermediate or 4 * spec.hidden
    per_seq = c * (4 * spec.hidden + 3 * inter) * 4 + spec.n_heads * c * context * 4
    return int(batch * (per_seq + (spec.vocab or 0) * 4))


def training_bytes(
    spec: ModelSpec,
    n_params: int,
    context: int,
    batch: int,
    lora_rank: int,
    tensors: Sequence[Tensor],
) -> dict[str, int]:
    """Full fine-tune (mixed precision AdamW) and LoRA, with activation checkpointing.

    Full: 16 B per parameter (bf16 weights and grads, fp32 master weights, Adam m and v; ZeRO
    paper's accounting). LoRA: frozen bf16 base (2 B/param) and rank-``lora_rank`` adapters on
    every decoder projection at 16 B per adapter parameter. Activations: with checkpointing
    each layer keeps its bf16 input (2*b*s*h B) and one layer is recomputed at 34*b*s*h B
    (Korthikanti et al. 2022, flash attention, so no s^2 term), plus fp32 logits b*s*vocab*4."""
    b, s, h = batch, context, spec.hidden
    acts = spec.n_layers * 2 * b * s * h + 34 * b * s * h + b * s * (spec.vocab or 0) * 4
    lora_params = sum(lora_rank * (t.shape[0] + t.shape[1]) for t in tensors if t.is_linear)
    return {
        "full_finetune": 16 * n_params + acts,
        "lora": 2 * n_params + 16 * lora_params + acts,
        "lora_params": lora_params,
        "activations": acts,
    }


def _moe_params(family: Family, tensors: Sequence[Tensor]) -> dict[str, int] | None:
    """Total, routed-expert and active parameters (active: all but the routed experts, plus
    ``top_k`` experts' worth: what one token runs through, shared experts included, as Mistral
    and Qwen count it). ``active_excl_embedding`` leaves out the token-embedding table (a token
    reads one row of it; the output head, when separate, still counts), as OpenAI counts
    gpt-oss's active parameters (model card: 3.61B of 20.91B, 5.13B of 116.83B)."""
    experts = sum(t.numel for t in tensors if t.is_expert)
    n_expert = int(family.get("num_local_experts", "num_experts", default=0) or 0)
    top_k = int(family.get("num_experts_per_tok", default=0) or 0)
    if not experts or n_expert < 2:
        return None
    total = sum(t.numel for t in tensors)
    per_expert = experts // n_expert
    active = total - experts + top_k * per_expert
    tied = not any(t.gguf == "output.weight" for t in tensors)
    embedding = 0 if tied else sum(t.numel for t in tensors if t.gguf == "token_embd.weight")
    return {
        "n_expert": n_expert,
        "top_k": top_k,
        "experts": experts,
        "per_expert": per_expert,
        "active": active,
        "active_excl_embedding": active - embedding,
    }


def gpus_needed(total_bytes: int, gpu_gb: float) -> int:
    """GPUs of ``gpu_gb`` GiB each, keeping GPU_RESERVE_BYTES free on every one."""
    usable = gpu_gb * GIB - GPU_RESERVE_BYTES
    return max(1, math.ceil(total_bytes / usable))


@dataclass
class Report:
    model: dict[str, object]
    params: dict[str, object]
    formats: list[FormatSize]
    runtime: dict[str, object]
    training: dict[str, object]

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "params": self.params,
            "formats": [asdict(f) for f in self.formats],
            "runtime": self.runtime,
            "training": self.training,
        }


def build_report(
    ckpt: Checkpoint,
    *,
    context: int | None = None,
    batch: int = 1,
    cache_dtype: str | None = None,
    gpu_sizes: Sequence[float] = DEFAULT_GPU_SIZES_GB,
    lora_rank: int = 16,
) -> Report:
    spec = ModelSpec.from_config(ckpt.config)
    tensors = model_tensors(ckpt, spec)
    n_params = sum(t.numel for t in tensors)
    ctx = context or min(spec.max_context or 4096, 4096)
    by_component: dict[str, int] = {}
    for t in tensors:
        c = component(t.gguf, len(t.shape))
        by_component[c] = by_component.get(c, 0) + t.numel
    by_dtype: dict[str, int] = {}
    family = family_for(ckpt.config, strict=False)
    for info in ckpt.tensors.values():
        g = family.gguf_name(info.name) or info.name
        if spec.tied_embeddings and g == "output.weight":
            continue
        n = sum(math.prod(s) for _, s in family.stored_params(info.name, info.shape))
        if n:  # quantization scales hold none
            key = info.dtype if n == info.numel else f"{info.dtype} packed"
            by_dtype[key] = by_dtype.get(key, 0) + n
    cache_name = (cache_dtype or spec.dtype or "bfloat16").lower()
    if cache_name not in DTYPE_BYTES:
        raise ValueError(
            f"unknown cache dtype {cache_dtype!r}; use one of {', '.join(DTYPE_BYTES)}"
        )
    kv = kv_cache_bytes(spec, ctx, batch, DTYPE_BYTES[cache_name])
    acts = activation_bytes(spec, ctx, batch)
    formats = weight_formats(tensors, family_for(ckpt.config, strict=False))
    runtime_rows = []
    for f in formats:
        total = f.bytes + kv + acts
        runtime_rows.append(
            {
                "format": f.format,
                "weights": f.bytes,
                "total": total,
                "gpus": {str(g): gpus_needed(total, g) for g in gpu_sizes},
            }
        )
    train = training_bytes(spec, n_params, ctx, batch, lora_rank, tensors)
    train_rows = {
        k: {"bytes": train[k], "gpus": {str(g): gpus_needed(train[k], g) for g in gpu_sizes}}
        for k in ("full_finetune", "lora")
    }
    return Report(
        model={
            "source": ckpt.source,
            "format": ckpt.format,
            "model_type": spec.model_type,
            "architecture": spec.architecture,
            "layers": spec.n_layers,
            "hidden": spec.hidden,
            "intermediate": spec.intermediate,
            "heads": spec.n_heads,
            "kv_heads": spec.n_kv_heads,
            "head_dim": spec.head_dim,
            "vocab": spec.vocab,
            "context_length": spec.max_context,
            "tied_embeddings": spec.tied_embeddings,
            "sliding_window": spec.sliding_window,
            "dtype": spec.dtype,
            "bytes_on_disk": ckpt.bytes_on_disk,
            "gguf_export_supported": spec.supported,
        },
        params={
            "total": n_params,
            "by_component": by_component,
            "by_dtype": by_dtype,
            **({"moe": moe} if (moe := _moe_params(family, tensors)) else {}),
        },
        formats=formats,
        runtime={
            "context": ctx,
            "batch": batch,
            "cache_dtype": cache_name,
            "kv_cache": kv,
            "activations": acts,
            "gpu_sizes_gib": list(gpu_sizes),
            "gpu_reserve_bytes": GPU_RESERVE_BYTES,
            "rows": runtime_rows,
            "activation_formula": activation_bytes.__doc__.split("\n")[0].strip()
            if activation_bytes.__doc__
            else "",
        },
        training={
            "lora_rank": lora_rank,
            "lora_params": train["lora_params"],
            "activations": train["activations"],
            **train_rows,
        },
    )
