"""Every GGUF block type as a grid, built on the codecs (``qtool.kernels``).

A block's parameters are fitted as llama.cpp fits them: the codec encodes the block's current
values (with the importance weights when given, as ``llama-quantize --imatrix`` does), and the
encoded block's scales, mins and super-scales define, per weight, ``value = scale * code +
offset`` with an integer code in ``[lo, hi]`` (``qtool.kernels.block_affine``). A method may then
choose other codes on that grid (GPTQ, column by column); :meth:`GGUFGrid.assemble` writes them
into the fitted blocks (``block_with_codes``), so the bytes are the type's own layout and
llama.cpp decodes them with its own dequantizer. Round-to-nearest is the codec itself: the
exact bytes ``llama-quantize`` writes.

The float types (F32, F16, BF16) are grids too: the nearest representable float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from qtool.kernels.types import QuantType, get_type

from qtool.errors import BadInputError
from qtool.grids.base import AffineForm, Fit, Grid

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class GGUFWeight:
    """A tensor as GGUF stores it: ``qtype`` and its rows' encoded bytes ``[rows, row_bytes]``
    (HF row order; the GGUF format applies the family's row transform when writing)."""

    name: str
    qtype: str
    data: np.ndarray  # uint8 [rows, row_bytes]; float32/float16 values for the float types
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.data.shape[0]), self.cols)

    def dequantize(self, dtype: Any = None) -> torch.Tensor:
        from qtool.kernels import dequantize

        if self.qtype in FLOAT_TYPES:
            x = np.asarray(self.data, dtype=np.float32)
        else:
            x = dequantize(self.data, self.qtype, self.cols, name=self.name)
        return torch.from_numpy(np.ascontiguousarray(x)).to(dtype or torch.float32)

    def state(self) -> dict[str, Any]:
        if self.qtype in FLOAT_TYPES:
            return {"values": torch.from_numpy(np.ascontiguousarray(self.data, np.float32))}
        return {"data": torch.from_numpy(np.ascontiguousarray(self.data))}


class _BlockFit(Fit):
    """A GGUF block fitted by the codec: its bytes, and the affine form of every weight (made
    when first asked for: the compiled solver copies it once and this object never keeps it)."""

    def __init__(self, data: np.ndarray, qtype: str) -> None:
        self.data = data  # uint8 [rows, type_size]
        self.qtype = qtype
        self._params: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float] | None = None

    def affine(self) -> AffineForm:
        from qtool.kernels import block_affine

        scale, offset, lo, hi = block_affine(self.data, self.qtype)
        return AffineForm(
            torch.from_numpy(np.ascontiguousarray(scale, np.float32)),
            torch.from_numpy(np.ascontiguousarray(offset, np.float32)),
            float(lo),
            float(hi),
            True,
        )

    def quantize(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._params is None:
            form = self.affine()
            self._params = (form.scale, form.base, form.scale != 0, form.lo, form.hi)
        scale, offset, nonzero, lo, hi = self._params
        s, b, nz = scale[:, j], offset[:, j], nonzero[:, j]
        ratio = torch.where(nz, (x - b) / torch.where(nz, s, 1), 0)
        q = torch.clamp(torch.round(ratio), lo, hi)
        return q.to(torch.int32), s * q + b


class _TableFit(Fit):
    """A GGUF block whose values are a table per block (MXFP4: 16 E2M1 values times the block's
    power of two), fitted by the codec: code j decodes to ``table[row, j]``."""

    def __init__(self, data: np.ndarray, qtype: str) -> None:
        from qtool.kernels import codec_for

        codec = codec_for(qtype)
        self.data = data  # uint8 [rows, type_size] (one block per row)
        self.table = torch.from_numpy(codec.table(data))  # type: ignore[attr-defined]

    def quantize(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the nearest value, the first code on ties (as the codec's encoder picks it)
        q = torch.argmin((self.table - x[:, None]).abs(), dim=1)
        return q.to(torch.int32), self.table.gather(1, q[:, None])[:, 0]


class _FloatFit(Fit):
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def quantize(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = x.to(self.dtype).to(torch.float32)
        return torch.zeros_like(x, dtype=torch.int32), v


_TORCH_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class GGUFGrid(Grid):
    """One GGUF tensor type (``Q4_K``, ``Q8_0``, ``TQ2_0``, ``F16``...)."""

    kind: ClassVar[str] = "gguf"

    def __init__(self, qtype: str) -> None:
        self.qt: QuantType = get_type(qtype)

    @property
    def key(self) -> str:
        return self.qt.name

    @property
    def qtype(self) -> str:
        return self.qt.name

    @property
    def is_float(self) -> bool:
        return self.qt.name in FLOAT_TYPES

    @property
    def has_codes(self) -> bool:
        """Whether GPTQ can choose codes on it: a float type, or a block type whose bytes hold
        integer codes on an affine grid (not MXFP4's E2M1 values)."""
        from qtool.kernels import codec_for

        codec = codec_for(self.qt.name)
        return self.is_float or codec.code_range is not None or self._table

    @property
    def _table(self) -> bool:
        from qtool.kernels import codec_for

        return hasattr(codec_for(self.qt.name), "table")

    def columns(self, cols: int) -> int:
        return self.qt.block_size if not self.is_float else 1

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 1 or shape[-1] % self.qt.block_size:
            raise BadInputError(
                f"{name}: rows of {shape[-1]} do not divide into {self.qt.name} blocks of "
                f"{self.qt.block_size}"
            )

    def nbytes(self, shape: tuple[int, ...]) -> int:
        n = int(np.prod(shape))
        return n // self.qt.block_size * self.qt.type_size

    def prepare(self, w: torch.Tensor) -> Any:
        """Each row's mean square: llama.cpp's imatrix weights for the 32-blocks of Q4_0, Q4_1,
        Q5_0 and Q5_1 use the whole row's (``quantize_row_q4_0_impl``)."""
        if self.is_float or self.qt.block_size != 32:
            return None
        from qtool.kernels import row_sigma2

        return row_sigma2(w.detach().to(torch.float32).contiguous().numpy())

    def fit(
        self, w: torch.Tensor, importance: torch.Tensor | None = None, state: Any = None
    ) -> Fit:
        if self.is_float:
            return _FloatFit(_TORCH_FLOATS[self.qt.name])
        from qtool.kernels import quantize_part

        x = w.detach().to(torch.float32).contiguous().numpy()
        imp = None if importance is None else importance.detach().float().contiguous().numpy()
        data = quantize_part(x, self.qt.name, imp, state)
        return _TableFit(data, self.qt.name) if self._table else _BlockFit(data, self.qt.name)

    def assemble(
        self,
        name: str,
        shape: tuple[int, int],
        fits: list[Fit],
        codes: torch.Tensor,
        g_idx: torch.Tensor | None,
    ) -> GGUFWeight:
        rows, cols = shape
        if self.is_float:
            raise BadInputError(f"{name}: {self.qt.name} is not a block type")
        if g_idx is not None:
            raise BadInputError(f"{name}: GGUF blocks are fixed column ranges (no g_idx)")
        from qtool.kernels import block_with_codes, codec_for

        bs = self.qt.block_size
        parts = []
        c = codes.cpu().numpy()
        for b, f in enumerate(fits):
            cb = c[:, b * bs : (b + 1) * bs]
            if isinstance(f, _TableFit):
                parts.append(codec_for(self.qt.name).with_codes(f.data, cb))
                continue
            assert isinstance(f, _BlockFit)
            parts.append(block_with_codes(f.data, self.qt.name, cb))
        return GGUFWeight(name, self.qt.name, np.concatenate(parts, axis=1), cols)

    def rtn(self, name: str, w: torch.Tensor, importance: torch.Tensor | None = None) -> GGUFWeight:
        x = w.detach().to(torch.float32).contiguous().numpy()
        if self.is_float:
            data = x.astype({"F32": np.float32, "F16": np.float16, "BF16": np.float32}[self.qtype])
            if self.qtype == "BF16":
                data = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
            return GGUFWeight(name, self.qt.name, data, x.shape[1])
        from qtool.kernels import quantize

        imp = None if importance is None else importance.detach().float().contiguous().numpy()
        return GGUFWeight(name, self.qt.name, quantize(x, self.qt.name, imp, name=name), x.shape[1])

    def restore(self, name: str, state: dict[str, Any]) -> GGUFWeight:
        if "values" in state:
            v = state["values"].numpy()
            return GGUFWeight(name, self.qt.name, v, v.shape[1])
        data = state["data"].numpy()
        cols = data.shape[1] // self.qt.type_size * self.qt.block_size
        return GGUFWeight(name, self.qt.name, data, cols)
