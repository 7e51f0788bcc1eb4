"""What a grid is: the values a weight may take, fitted block by block, and its quantized tensor.

A **grid** (affine int per tensor / channel / group, each GGUF block type, ternary) answers:

- ``columns(cols)``: how many consecutive input columns share one set of parameters (a group,
  a GGUF block, a whole row);
- ``fit(w, importance)``: the parameters of one block of columns ``w`` ``[rows, c]`` for every
  row, as the grid's own reference fits them (min/max with clipping; llama.cpp's own search
  for a GGUF block); returns a :class:`Fit`;
- ``Fit.quantize(j, x)``: the integer codes and the values of column ``j`` of the block for
  values ``x`` ``[rows]`` (nearest grid point given the fitted parameters);
- ``assemble(name, shape, fits, codes, ...)``: the quantized tensor a format writes (a
  :class:`QuantizedTensor`), from the fits and codes GPTQ chose;
- ``rtn(name, w, importance)``: round-to-nearest of a whole tensor, exactly as the grid's
  reference does it (for a GGUF type: llama.cpp's bytes);
- ``nbytes(shape)``: the size of the tensor on this grid, known from its shape (plans, dry runs).

A **method** (RTN, GPTQ, BitNet absmean) chooses codes on any grid; a **format** writes the
quantized tensors its layout can hold. Grids import no method and no format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol


class QuantizedTensor(Protocol):
    """A weight on a grid: what formats write and what eval and propagation decode."""

    name: str

    @property
    def shape(self) -> tuple[int, int]: ...

    def dequantize(self, dtype: Any = None) -> Any:
        """The float weight (a torch tensor, ``[out, in]``)."""
        ...

    def state(self) -> dict[str, Any]:
        """Tensors (torch) that :meth:`Grid.restore` turns back into this object (resume)."""
        ...


class Fit(ABC):
    """Fitted parameters of one block of columns, for every row."""

    @abstractmethod
    def quantize(self, j: int, x: Any) -> tuple[Any, Any]:
        """Codes (an integer tensor) and values (float32) of column ``j`` of the block."""

    def affine(self) -> AffineForm | None:
        """The fit as affine parameters, when :meth:`quantize` is one of the two affine forms
        a compiled solver runs (:func:`qtool.kernels.columns.gptq_rows`); None otherwise."""
        return None


@dataclass(frozen=True)
class AffineForm:
    """What :meth:`Fit.quantize` computes, as parameters: ``scale`` and ``base`` float32
    ``[rows, k]`` (``k`` = 1: one pair for every column of the block; else one per column),
    codes in ``[lo, hi]``. ``offset_form`` False: ``q = clamp(round(x / s) + z)``,
    ``x' = (q - z) s`` (``base`` = the zero point ``z``); True: ``q = clamp(round((x - b) / s))``
    (0 where ``s`` = 0), ``x' = s q + b`` (``base`` = the offset ``b``)."""

    scale: Any
    base: Any
    lo: float
    hi: float
    offset_form: bool


class Grid(ABC):
    """A set of representable weight values with per-block parameters."""

    kind: ClassVar[str]  # "int", "gguf", "ternary", "float"

    @property
    @abstractmethod
    def key(self) -> str:
        """A short canonical name, e.g. ``int4-sym-g128``, ``Q4_K``, ``ternary``."""

    @abstractmethod
    def columns(self, cols: int) -> int:
        """Consecutive input columns sharing one set of parameters."""

    @property
    def tensor_wide(self) -> bool:
        """One set of parameters for the whole tensor (fitted once, up front)."""
        return False

    def prepare(self, w: Any) -> Any:
        """Whole-weight facts a block's fit needs (llama.cpp's legacy imatrix fits use each
        row's mean square); passed to every :meth:`fit` as ``state``. None by default."""
        return None

    @abstractmethod
    def fit(self, w: Any, importance: Any | None = None, state: Any = None) -> Fit:
        """Parameters for the block ``w`` ``[rows, c]`` (``importance`` ``[c]``; ``state``
        from :meth:`prepare` on the whole weight)."""

    @abstractmethod
    def assemble(
        self, name: str, shape: tuple[int, int], fits: list[Fit], codes: Any, g_idx: Any | None
    ) -> QuantizedTensor:
        """The quantized tensor from GPTQ's fits (one per block, in column order) and codes
        ``[rows, cols]``; ``g_idx``: the block of each column when blocks are not contiguous.
        ``codes`` may be a transposed view (GPTQ solves column by column); the tensor keeps
        them row-major, as a restored one has them: a weight dequantized from strided codes
        is strided too, and a bf16 matrix product over a strided weight takes another kernel
        with other bits, so a run resumed from the saved codes would differ."""

    @abstractmethod
    def rtn(self, name: str, w: Any, importance: Any | None = None) -> QuantizedTensor:
        """Round-to-nearest quantization of the whole weight ``w`` ``[rows, cols]``."""

    @abstractmethod
    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of ``shape`` on this grid (codes and parameters)."""

    @abstractmethod
    def restore(self, name: str, state: dict[str, Any]) -> QuantizedTensor:
        """Inverse of :meth:`QuantizedTensor.state`."""

    def check(self, name: str, shape: tuple[int, ...]) -> None:  # noqa: B027 - optional hook
        """Raise a BadInputError if a tensor of ``shape`` cannot be held by this grid."""

    def __str__(self) -> str:
        return self.key
