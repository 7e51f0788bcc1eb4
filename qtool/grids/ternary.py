"""BitNet grids: b1.58 ternary (absmean) and the original 1-bit (sign) weights.

- **b1.58** (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58
  Bits", eq. 1-3): ``gamma = mean |W|`` over the whole tensor and
  ``W~ = RoundClip(W / (gamma + eps), -1, 1)``, ``RoundClip(x, a, b) = max(a, min(b, round(x)))``;
  the weight decodes to ``gamma * W~``.
- **1-bit** (Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language Models",
  eq. 1-3): ``alpha = mean(W)``, ``W~ = Sign(W - alpha)`` with ``Sign(x) = +1 if x > 0 else -1``,
  and the scale ``beta = mean |W|``; the weight decodes to ``beta * W~``.

One parameter set per tensor (``tensor_wide``): GPTQ fits it once, up front, then picks the
codes column by column with error feedback; RTN on these grids is the papers' quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from qtool.errors import BadInputError
from qtool.grids.base import Fit, Grid

EPS = 1e-5  # the paper's epsilon in W / (gamma + eps) (the value transformers' BitNet code uses)


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


@dataclass
class TernaryWeight:
    """b1.58 codes ``t`` (int8, values -1/0/1, the weight's shape) and the scale ``gamma``."""

    codes: torch.Tensor
    gamma: float
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.codes.to(torch.float32) * self.gamma).to(dtype or torch.float32)

    def state(self) -> dict[str, Any]:
        return {"codes": self.codes, "gamma": torch.tensor([self.gamma], dtype=torch.float64)}


@dataclass
class BinaryWeight:
    """1-bit codes (int8, values -1/+1), the centring ``alpha`` and the scale ``beta``."""

    codes: torch.Tensor
    alpha: float
    beta: float
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.codes.to(torch.float32) * self.beta).to(dtype or torch.float32)

    def state(self) -> dict[str, Any]:
        ab = torch.tensor([self.alpha, self.beta], dtype=torch.float64)
        return {"codes": self.codes, "alpha_beta": ab}


def ternarize(name: str, w: torch.Tensor) -> TernaryWeight:
    """BitNet b1.58 absmean quantization of one weight (one ``gamma`` per tensor)."""
    w = _checked(name, w)
    gamma = absmean(w)
    return TernaryWeight(ternary_codes(w, gamma), gamma, name)


def binarize(name: str, w: torch.Tensor) -> BinaryWeight:
    """BitNet (2023) 1-bit quantization: ``Sign(W - alpha)``, ``alpha = mean W``,
    ``beta = mean |W|``."""
    w = _checked(name, w)
    alpha = float(np.float32(w.to(torch.float64).mean().item()))
    beta = absmean(w)
    codes = torch.where(w - alpha > 0, 1, -1).to(torch.int8)
    return BinaryWeight(codes, alpha, beta, name)


class _TernaryFit(Fit):
    def __init__(self, gamma: float) -> None:
        self.gamma = gamma
        self.inv = float(np.float32(gamma + EPS))

    def quantize(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.round(x / self.inv).clamp(-1, 1)
        return t.to(torch.int32), t * self.gamma


class _BinaryFit(Fit):
    def __init__(self, alpha: float, beta: float) -> None:
        self.alpha, self.beta = alpha, beta

    def quantize(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.where(x - self.alpha > 0, 1.0, -1.0)
        return t.to(torch.int32), t * self.beta


class _TensorWide(Grid):
    """A grid with one parameter set per tensor, fitted once, up front."""

    @property
    def key(self) -> str:
        return self.kind

    @property
    def tensor_wide(self) -> bool:
        return True

    def columns(self, cols: int) -> int:
        return cols


class TernaryGrid(_TensorWide):
    """{-gamma, 0, +gamma}, one gamma per tensor (BitNet b1.58)."""

    kind: ClassVar[str] = "ternary"

    def nbytes(self, shape: tuple[int, ...]) -> int:
        # transformers' BitNet layout: 4 codes a byte, one scale
        return int(np.prod(shape)) // 4 + 4

    def fit(self, w: torch.Tensor, importance: Any = None, state: Any = None) -> Fit:
        return _TernaryFit(absmean(_checked("weight", w)))

    def assemble(
        self,
        name: str,
        shape: tuple[int, int],
        fits: list[Fit],
        codes: torch.Tensor,
        g_idx: torch.Tensor | None,
    ) -> TernaryWeight:
        (fit,) = fits
        assert isinstance(fit, _TernaryFit)
        return TernaryWeight(
            codes.to(torch.int8, memory_format=torch.contiguous_format).cpu(), fit.gamma, name
        )

    def rtn(self, name: str, w: torch.Tensor, importance: Any = None) -> TernaryWeight:
        return ternarize(name, w)

    def restore(self, name: str, state: dict[str, Any]) -> TernaryWeight:
        return TernaryWeight(state["codes"], float(state["gamma"][0]), name)


class BinaryGrid(_TensorWide):
    """{-beta, +beta} around ``alpha``, one pair per tensor (BitNet 2023)."""

    kind: ClassVar[str] = "binary"

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape)) * 2  # written dense (bf16): no loader has a 1-bit format

    def fit(self, w: torch.Tensor, importance: Any = None, state: Any = None) -> Fit:
        b = binarize("weight", w)
        return _BinaryFit(b.alpha, b.beta)

    def assemble(
        self,
        name: str,
        shape: tuple[int, int],
        fits: list[Fit],
        codes: torch.Tensor,
        g_idx: torch.Tensor | None,
    ) -> BinaryWeight:
        (fit,) = fits
        assert isinstance(fit, _BinaryFit)
        return BinaryWeight(
            codes.to(torch.int8, memory_format=torch.contiguous_format).cpu(),
            fit.alpha,
            fit.beta,
            name,
        )

    def rtn(self, name: str, w: torch.Tensor, importance: Any = None) -> BinaryWeight:
        return binarize(name, w)

    def restore(self, name: str, state: dict[str, Any]) -> BinaryWeight:
        ab = state["alpha_beta"]
        return BinaryWeight(state["codes"], float(ab[0]), float(ab[1]), name)
