"""BitNet weight quantization: b1.58 ternary (absmean) and the original 1-bit (sign) variant.

- **b1.58** (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58
  Bits", eq. 1-3): ``gamma = mean |W|`` over the whole tensor and
  ``W~ = RoundClip(W / (gamma + eps), -1, 1)``, ``RoundClip(x, a, b) = max(a, min(b, round(x)))``;
  the weight decodes to ``gamma * W~``.
- **1-bit** (Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language Models",
  eq. 1-3): ``alpha = mean(W)``, ``W~ = Sign(W - alpha)`` with ``Sign(x) = +1 if x > 0 else -1``,
  and the scale ``beta = mean |W|`` (``||W||_1 / (n m)``); the weight decodes to ``beta * W~``.

The quantized tensors are the decoder layers' linear weights (:func:`is_decoder_linear`); the
embeddings, the output head and the norms keep their precision, as in both papers.
:class:`TernarizeRows` plugs b1.58 into the GGUF export (TQ1_0 / TQ2_0), and
:mod:`qtool.quantize.formats.bitnet` writes the transformers ``bitnet`` safetensors layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtool.arch import is_decoder_linear
from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, UnsupportedError
from qtool.output import Output

EPS = 1e-5  # the paper's epsilon in W / (gamma + eps) (the value transformers' BitNet code uses)


@dataclass
class TernaryWeight:
    """b1.58 codes ``t`` (int8, values -1/0/1, the weight's shape) and the scale ``gamma``."""

    codes: torch.Tensor
    gamma: float

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.to(torch.float32) * self.gamma).to(dtype)


@dataclass
class BinaryWeight:
    """1-bit codes (int8, values -1/+1), the centring ``alpha`` and the scale ``beta``."""

    codes: torch.Tensor
    alpha: float
    beta: float

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.to(torch.float32) * self.beta).to(dtype)


def _checked(name: str, w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2:
        raise BadInputError(f"{name}: shape {tuple(w.shape)} is not a 2-D weight")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise BadInputError(
            f"{name}: {bad} weight(s) are NaN or infinite", hint="the checkpoint is damaged"
        )
    return w


def absmean(w: torch.Tensor) -> float:
    """``gamma = mean |W|`` (accumulated in float64, returned as a float32 value)."""
    return float(np.float32(w.detach().to(torch.float64).abs().mean().item()))


def ternary_codes(w: torch.Tensor, gamma: float) -> torch.Tensor:
    """``RoundClip(w / (gamma + eps), -1, 1)`` as int8 (round half to even, as torch rounds)."""
    x = w.to(torch.float32) / float(np.float32(gamma + EPS))
    return torch.round(x).clamp(-1, 1).to(torch.int8)


def ternarize(name: str, w: torch.Tensor) -> TernaryWeight:
    """BitNet b1.58 absmean quantization of one weight (one ``gamma`` per tensor)."""
    w = _checked(name, w)
    gamma = absmean(w)
    return TernaryWeight(ternary_codes(w, gamma), gamma)


def binarize(name: str, w: torch.Tensor) -> BinaryWeight:
    """BitNet (2023) 1-bit quantization: ``Sign(W - alpha)``, ``alpha = mean W``,
    ``beta = mean |W|``."""
    w = _checked(name, w)
    alpha = float(np.float32(w.to(torch.float64).mean().item()))
    beta = absmean(w)
    codes = torch.where(w - alpha > 0, 1, -1).to(torch.int8)
    return BinaryWeight(codes, alpha, beta)


class TernarizeRows:
    """The GGUF export's per-tensor transform for b1.58: a decoder linear weight's rows become
    ``gamma * W~`` (``gamma`` of the whole tensor, read once, so row chunks agree); any other
    tensor passes unchanged. TQ1_0 / TQ2_0 then store ``W~`` exactly and ``d = fp16(gamma)``.

    ``gamma`` is taken over the tensor as stored; the export's reordering of rows (Llama's
    q/k permutation) does not change a mean of ``|w|``, and the codes are elementwise."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.gammas: dict[str, float] = {}

    def __call__(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        info = self.ckpt.tensors[hf_name]
        if not is_decoder_linear(hf_name, len(info.shape)):
            return rows
        if hf_name not in self.gammas:
            self.gammas[hf_name] = ternarize(hf_name, self.ckpt.read(hf_name)).gamma
        gamma = self.gammas[hf_name]
        t = ternary_codes(torch.from_numpy(rows), gamma).numpy()
        return t.astype(np.float32) * np.float32(gamma)


TQ_TYPES = ("TQ1_0", "TQ2_0")


def export_bitnet_gguf(
    ckpt: Checkpoint,
    out_path: Path,
    qtype: str = "TQ2_0",
    out: Output | None = None,
    *,
    tokenizer_pre: str | None = None,
) -> tuple[int, dict[str, float]]:
    """Write a b1.58 GGUF: the ``qtype`` preset's plan (token embeddings Q4_K, output Q6_K, as
    llama-quantize), decoder linear weights ternarized before TQ encoding. Returns the file
    size and the ``gamma`` of each ternarized tensor."""
    from qtool.export.gguf_export import export_gguf, make_plan

    if qtype.upper() not in TQ_TYPES:
        raise BadInputError(f"BitNet GGUF type {qtype}: use TQ1_0 or TQ2_0")
    plan, arch = make_plan(ckpt, qtype.upper())
    fallback = [
        e.name
        for e in plan.entries
        if is_decoder_linear(e.hf_name, len(e.shape)) and e.qtype not in TQ_TYPES
    ]
    if fallback:
        raise UnsupportedError(
            f"{fallback[0]}: rows of this model do not divide into 256-value TQ blocks",
            hint="BitNet GGUF export needs every linear layer's input size to be a multiple of 256",
        )
    transform = TernarizeRows(ckpt)
    size = export_gguf(
        ckpt,
        out_path,
        plan,
        arch,
        out or Output(verbosity=-1),
        tokenizer_pre=tokenizer_pre,
        transform=transform,
    )
    return size, dict(transform.gammas)
