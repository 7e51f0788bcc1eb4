"""The affine integer grid: a scheme, its parameters, codes, dequantization.

The primitives are separate on purpose (choose parameters -> integer codes -> pack -> decode):
GPTQ reuses :func:`fit_params` and :func:`quantize_codes` column block by column block, the
writers only pack :class:`QuantizedWeight`, and eval runs on :meth:`QuantizedWeight.dequantize`.

Conventions (the ones GPTQ checkpoints and compressed-tensors share):

- codes are **unsigned**, ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` and ``w ~ (q - z) * s``;
- symmetric: ``z = 2^(b-1)``. "full" range uses ``s = absmax / ((2^b - 1) / 2)`` and every code
  (the GPTQ reference ``Quantizer`` and compressed-tensors' ``calculate_qparams``); "restricted"
  uses ``s = absmax / (2^(b-1) - 1)`` and leaves code 0 unused, so the grid is symmetric
  (±(2^(b-1) - 1), as in LLM.int8() / SmoothQuant);
- asymmetric: the range always contains 0 (``min <= 0 <= max``) so that 0 is exact,
  ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``;
- ``round`` is round-half-to-even (``torch.round``), as everywhere in torch;
- scales are rounded to ``scale_dtype`` (float16 by default: what the GPTQ format stores) before
  the codes are computed, so a writer storing them loses nothing and every consumer decodes the
  same weights qtool evaluates;
- a group whose range is 0 (all zeros) gets scale 1 and zero ``2^(b-1)``, and decodes to exact
  zeros.

Granularity: ``tensor`` (one scale), ``channel`` (one per output row), ``group`` (one per output
row and ``group_size`` consecutive input columns, or per ``g_idx`` under act-order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from qtool.errors import BadInputError
from qtool.grids.base import AffineForm, Fit, Grid

Granularity = Literal["tensor", "channel", "group"]
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Clip:
    """How the quantization range is chosen: ``none`` (min/max), ``percentile`` (the P-th
    percentile of |w|, or the (100-P)-th/P-th of w when asymmetric), ``mse`` (grid search of a
    shrink factor minimising the squared error), ``kl`` (grid search minimising the KL divergence
    between the float and the quantized value histograms)."""

    method: Literal["none", "percentile", "mse", "kl"] = "none"
    percentile: float = 100.0
    grid: int = 100  # candidate shrink factors 1, 1 - 1/grid, ... (GPTQ's Quantizer: grid=100)
    max_shrink: float = 0.8  # down to 1 - max_shrink (GPTQ's Quantizer: maxshrink=0.8)

    @classmethod
    def parse(cls, spec: str) -> Clip:
        """``none``, ``percentile:P`` (0 < P <= 100), ``mse`` or ``kl``."""
        s = spec.strip().lower()
        if s in ("none", "mse", "kl"):
            return cls(method=s)  # type: ignore[arg-type]
        if s.startswith("percentile:"):
            try:
                p = float(s.split(":", 1)[1])
            except ValueError:
                p = float("nan")
            if not 0.0 < p <= 100.0:
                raise BadInputError(
                    f"--clip {spec}: the percentile must be in (0, 100]",
                    hint="e.g. --clip percentile:99.9",
                )
            return cls(method="percentile", percentile=p)
        raise BadInputError(
            f"--clip {spec}: unknown clipping", hint="use none, percentile:P, mse or kl"
        )

    def __str__(self) -> str:
        return f"percentile:{self.percentile:g}" if self.method == "percentile" else self.method


@dataclass(frozen=True)
class QuantScheme(Grid):
    """An integer weight grid: bits, symmetry, range, granularity, clipping (the fit)."""

    kind = "int"

    bits: int = 4
    sym: bool = True
    granularity: Granularity = "group"
    group_size: int = 128
    restricted: bool = False  # symmetric only: use ±(2^(b-1)-1) and leave code 0 unused
    clip: Clip = field(default_factory=Clip)
    scale_dtype: str = "float16"
    # asymmetric only: the smallest zero point (1 for the GPTQ v1 layout, which stores zero - 1
    # in b bits; a group that would want 0 loses the top step of its range instead)
    min_zero: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BadInputError(f"--bits {self.bits}: must be between 2 and 8")
        if self.granularity not in ("tensor", "channel", "group"):
            raise BadInputError(f"granularity {self.granularity!r}: use tensor, channel or group")
        if self.granularity == "group" and self.group_size < 1:
            raise BadInputError(
                f"--group-size {self.group_size}: must be positive",
                hint="use -1 or --granularity channel for one scale per output channel",
            )
        if self.restricted and not self.sym:
            raise BadInputError("a restricted range applies to symmetric quantization only")
        if self.scale_dtype not in SCALE_DTYPES:
            raise BadInputError(f"scale dtype {self.scale_dtype}: use {', '.join(SCALE_DTYPES)}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        """Scales per output row for a weight with ``in_features`` columns."""
        if self.granularity != "group":
            return 1
        return math.ceil(in_features / self.group_size)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """A 2-D weight. A group size that does not divide the columns is allowed: the last
        group is shorter (as AutoGPTQ quantizes it, and as the GPTQ format's ``g_idx`` and
        ``ceil(in / group)`` scale rows store it); see :meth:`ragged`."""
        if len(shape) != 2:
            raise BadInputError(f"{name}: shape {shape} is not a 2-D weight")

    def ragged(self, in_features: int) -> bool:
        """Whether the last group of a weight with ``in_features`` columns is shorter. Such
        weights fit the GPTQ format but not compressed-tensors or vLLM's GPTQ kernels, which
        need the group size to divide the columns."""
        return self.granularity == "group" and in_features % self.group_size != 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["clip"] = str(self.clip)
        return d

    # -- the Grid interface ----------------------------------------------------------------------

    @property
    def key(self) -> str:
        g = {"tensor": "t", "channel": "c"}.get(self.granularity, f"g{self.group_size}")
        kind = ("sym" + ("r" if self.restricted else "")) if self.sym else "asym"
        clip = "" if self.clip.method == "none" else f"-{self.clip}"
        return f"int{self.bits}-{kind}-{g}{clip}"

    @property
    def tensor_wide(self) -> bool:
        return self.granularity == "tensor"

    def columns(self, cols: int) -> int:
        return self.group_size if self.granularity == "group" else cols

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        self.check_shape(name, shape)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Packed codes plus a float16 scale (and, asymmetric, a packed zero) per group."""
        rows, cols = shape
        groups = self.groups(cols) if self.granularity != "tensor" else 1
        codes = math.ceil(rows * cols * self.bits / 8)
        params = rows * groups * (2 + (0 if self.sym else 1))
        return codes + params

    def fit(
        self, w: torch.Tensor, importance: torch.Tensor | None = None, state: Any = None
    ) -> Fit:
        if self.granularity == "tensor":
            s, z = fit_params(w.reshape(1, -1), self, None)
            return _IntFit(s.expand(w.shape[0]), z.expand(w.shape[0]), self)
        s, z = fit_params(w, self, None if importance is None else importance)
        return _IntFit(s, z, self)

    def assemble(
        self,
        name: str,
        shape: tuple[int, int],
        fits: list[Fit],
        codes: torch.Tensor,
        g_idx: torch.Tensor | None,
    ) -> QuantizedWeight:
        scale = torch.stack([f.scale for f in fits], dim=1)  # type: ignore[attr-defined]
        zero = torch.stack([f.zero for f in fits], dim=1)  # type: ignore[attr-defined]
        return QuantizedWeight(
            name,
            codes.to(torch.uint8, memory_format=torch.contiguous_format).cpu(),
            scale.cpu(),
            zero.cpu(),
            self,
            g_idx=None if g_idx is None else g_idx.to(torch.int32).cpu(),
        )

    def rtn(
        self, name: str, w: torch.Tensor, importance: torch.Tensor | None = None
    ) -> QuantizedWeight:
        return quantize_weight(name, w, self, importance=importance)

    def restore(self, name: str, state: dict[str, Any]) -> QuantizedWeight:
        return QuantizedWeight(
            name, state["codes"], state["scale"], state["zero"], self, g_idx=state.get("g_idx")
        )


@dataclass
class QuantizedWeight:
    """One quantized ``nn.Linear`` weight ``[out, in]``.

    ``codes``: uint8 ``[out, in]`` unsigned codes; ``scale``: float32 ``[out, groups]`` (values
    exactly representable in the scheme's ``scale_dtype``); ``zero``: int32 ``[out, groups]``;
    ``g_idx``: int32 ``[in]``, the group of each input column (``None`` means ``c // group_size``,
    or 0 for tensor/channel granularity). Tensor granularity repeats one scale on every row."""

    name: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def group_index(self) -> torch.Tensor:
        """``g_idx`` if set (act-order), else the natural grouping."""
        if self.g_idx is not None:
            return self.g_idx.long()
        cols = torch.arange(self.shape[1])
        if self.scheme.granularity != "group":
            return torch.zeros_like(cols)
        return cols // self.scheme.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        g = self.group_index()
        s = self.scale[:, g]
        z = self.zero[:, g].to(torch.float32)
        return ((self.codes.to(torch.float32) - z) * s).to(dtype or torch.float32)

    def state(self) -> dict[str, Any]:
        out = {"codes": self.codes, "scale": self.scale, "zero": self.zero}
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out


class _IntFit(Fit):
    """Scale and zero point of one group (or channel, or the tensor) for every row."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> None:
        self.scale = scale
        self.zero = zero
        self.zf = zero.to(torch.float32)
        self.lo = 1.0 if scheme.sym and scheme.restricted else 0.0
        self.maxq = float(scheme.maxq)

    def quantize(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # as quantize_codes / fake_quantize, inlined: GPTQ calls this once per column
        q = torch.clamp(torch.round(x / self.scale) + self.zf, self.lo, self.maxq)
        return q, (q - self.zf) * self.scale

    def affine(self) -> AffineForm:
        return AffineForm(self.scale[:, None], self.zf[:, None], self.lo, self.maxq, False)


def _round_scale(scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    s = scale.to(SCALE_DTYPES[scheme.scale_dtype]).to(torch.float32)
    # A scale that underflows the storage type would decode everything to 0: use the
    # smallest normal value instead (the codes then saturate, which is the best available).
    tiny = torch.finfo(SCALE_DTYPES[scheme.scale_dtype]).tiny
    return torch.where((s == 0) & (scale > 0), torch.full_like(s, tiny), s)


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32, rounded to ``scale_dtype``) and zero (int32) for ranges ``[lo, hi]``
    (one per row). Symmetric schemes use ``max(|lo|, |hi|)``."""
    lo = torch.minimum(lo.to(torch.float32), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.to(torch.float32), torch.zeros_like(hi, dtype=torch.float32))
    if scheme.sym:
        amax = torch.maximum(-lo, hi)
        half = (1 << (scheme.bits - 1)) - 1 if scheme.restricted else scheme.maxq / 2
        scale = amax / half
        empty = amax == 0
        scale = _round_scale(torch.where(empty, torch.ones_like(scale), scale), scheme)
        zero = torch.full_like(scale, 1 << (scheme.bits - 1), dtype=torch.int32)
        return scale, zero
    scale = (hi - lo) / scheme.maxq
    empty = scale == 0
    scale = _round_scale(torch.where(empty, torch.ones_like(scale), scale), scheme)
    zero = torch.clamp(torch.round(-lo / scale), scheme.min_zero, scheme.maxq)
    # an all-zero group decodes to 0 with any zero point: use the middle one, which every
    # format can store (GPTQ v1 stores zero - 1 and cannot hold 0)
    zero = torch.where(empty, torch.full_like(zero, 1 << (scheme.bits - 1)), zero)
    return scale, zero.to(torch.int32)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme
) -> torch.Tensor:
    """Codes of ``w`` ``[rows, n]`` with per-row ``scale``/``zero`` ``[rows]`` or ``[rows, 1]``
    (or broadcastable ``[rows, n]``)."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    lo = 1 if scheme.sym and scheme.restricted else 0
    q = torch.round(w.to(torch.float32) / scale) + zero.to(torch.float32)
    return torch.clamp(q, lo, scheme.maxq).to(torch.uint8)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme
) -> torch.Tensor:
    """``dequantize(quantize(w))`` in float32, per-row parameters as in :func:`quantize_codes`."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    q = quantize_codes(w, scale, zero, scheme).to(torch.float32)
    return (q - zero.to(torch.float32)) * scale


def fit_params(
    w: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` ``[rows, n]``, with the scheme's clipping
    (``importance``: weights of the MSE search's errors, ``[n]`` or ``[rows, n]``)."""
    from qtool.grids.clip import fit_range

    lo, hi = fit_range(w.to(torch.float32), scheme, importance)
    return params_from_range(lo, hi, scheme)


def quantize_weight(
    name: str,
    w: torch.Tensor,
    scheme: QuantScheme,
    *,
    importance: torch.Tensor | None = None,
    chunk_rows: int = 4096,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``[out, in]`` weight under ``scheme``.
    ``importance`` ``[in]`` (e.g. the mean ``x^2`` of each input channel from ``qtool
    calibrate``) weights the squared errors of ``--clip mse``."""
    scheme.check_shape(name, tuple(w.shape))
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise BadInputError(
            f"{name}: {bad} weight(s) are NaN or infinite", hint="the checkpoint is damaged"
        )
    out, cols = w.shape
    imp = None if importance is None else importance.detach().to(torch.float32).reshape(-1)
    if imp is not None and imp.numel() != w.shape[1]:
        raise BadInputError(f"{name}: {imp.numel()} importance values for {w.shape[1]} columns")
    if scheme.granularity == "tensor":
        s, z = fit_params(w.reshape(1, -1), scheme, None if imp is None else imp.repeat(w.shape[0]))
        code = quantize_codes(w.reshape(1, -1), s, z, scheme).reshape(out, cols)
        return QuantizedWeight(
            name, code, s.expand(out, 1).clone(), z.expand(out, 1).clone(), scheme
        )
    step = cols if scheme.granularity == "channel" else scheme.group_size
    full = cols - cols % step
    scales, zeros, codes = [], [], []
    # the whole groups as one [out * groups, step] block, then a shorter last group if any
    blocks = (
        [(0, full, full // step), (full, cols, 1)] if full < cols else [(0, cols, cols // step)]
    )
    for c0, c1, n_groups in blocks:
        rows = w[:, c0:c1].reshape(out * n_groups, -1)
        # row r is output channel r // n_groups, group r % n_groups: its columns' importance
        imp_rows = None if imp is None else imp[c0:c1].reshape(n_groups, -1).repeat(out, 1)
        bs, bz, bc = [], [], []
        for i, part in enumerate(rows.split(chunk_rows)):  # bounds the clip search's memory
            part_imp = (
                None if imp_rows is None else imp_rows[i * chunk_rows : i * chunk_rows + len(part)]
            )
            s, z = fit_params(part, scheme, part_imp)
            bs.append(s)
            bz.append(z)
            bc.append(quantize_codes(part, s, z, scheme))
        scales.append(torch.cat(bs).reshape(out, n_groups))
        zeros.append(torch.cat(bz).reshape(out, n_groups))
        codes.append(torch.cat(bc).reshape(out, -1))
    return QuantizedWeight(
        name,
        torch.cat(codes, dim=1).contiguous(),
        torch.cat(scales, dim=1).contiguous(),
        torch.cat(zeros, dim=1).contiguous(),
        scheme,
    )
