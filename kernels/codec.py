"""The codec base class: validation, reshaping, chunking, threads, and the reference/fast dispatch.

A quant type is a small subclass in its family file (``floats.py``, ``legacy.py``, ``kquants.py``,
``ternary.py``) that only knows blocks: ``quantize_blocks`` maps float32 ``(n_blocks, block_size)``
to uint8 ``(n_blocks, type_size)`` and ``dequantize_blocks`` maps back. Types whose llama.cpp
quantizer takes an importance matrix also implement ``quantize_blocks_imatrix`` (the per-column
weights arrive already laid out like the blocks). Subclassing registers the codec by type name.

Quantized types also expose their grid for GPTQ-style solvers, on encoded blocks ``q``:
``affine(q)`` gives per-weight ``scale`` and ``offset`` and the code range ``[lo, hi]`` such that
each weight decodes to ``scale * code + offset``; ``codes(q)`` reads the integer codes in that
convention; ``with_codes(q, codes)`` writes new codes and leaves every header field as it was.

Rows stream through in chunks of about ``CHUNK_VALUES`` floats, so memory stays bounded for any
tensor size, and chunks are spread over threads. Each codec has a reference path (vectorised
numpy, always available) and may have a fast path (numba, ``kernels/_fast.py``); both produce the
exact bytes of llama.cpp's ``ggml_quantize_chunk`` and the tests check both against it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
from qtool.kernels.types import QuantType, get_type

from qtool.errors import BadInputError

CHUNK_VALUES = 1 << 18  # floats per work item: big enough to amortise numpy calls, cache-friendly

# "auto" takes the fast path where one exists and numba imports; "reference" forces numpy.
BACKENDS = ("auto", "reference", "fast")


class CodecInputError(BadInputError):
    """Input a codec cannot take: wrong dtype, shape, length, or non-finite values."""


class Codec:
    """One GGUF tensor type: a block codec plus the shared row handling."""

    qtype: ClassVar[QuantType]
    uses_imatrix: ClassVar[bool] = False  # whether llama.cpp's quantizer reads the imatrix
    registry: ClassVar[dict[str, Codec]] = {}

    def __init_subclass__(cls, type_name: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if type_name is not None:
            cls.qtype = get_type(type_name)
            Codec.registry[cls.qtype.name] = cls()

    @classmethod
    def diagram(cls) -> str:
        """The bit-layout comment written above the codec class (its block diagram)."""
        return inspect.getcomments(cls) or ""

    # --- what a type implements -------------------------------------------------------------

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        """float32 (n_blocks, block_size) -> uint8 (n_blocks, type_size), no importance matrix."""
        raise NotImplementedError

    def quantize_blocks_imatrix(self, x: np.ndarray, qw: np.ndarray) -> np.ndarray:
        """Like :meth:`quantize_blocks`, weighted by ``qw`` (the imatrix, laid out like ``x``)."""
        raise NotImplementedError

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, type_size) -> float32 (n_blocks, block_size)."""
        raise NotImplementedError

    # --- the block grid (quantized types only) ------------------------------------------------

    # [lo, hi] of the integer codes in :meth:`codes`' convention; None for the float types.
    code_range: ClassVar[tuple[int, int] | None] = None

    def affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """uint8 (n_blocks, type_size) -> ``(scale, offset, lo, hi)``.

        ``scale`` and ``offset`` are float32 (n_blocks, block_size): weight ``i`` decodes to
        ``scale[i] * code[i] + offset[i]`` with an integer code in ``[lo, hi]``. A block whose
        fp16 scale fields are inf or NaN has no such form (its scale/offset come out non-finite).
        """
        raise NotImplementedError(f"{self.qtype.name} is not a grid of integer codes")

    def codes(self, q: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, type_size) -> int32 (n_blocks, block_size): the stored codes."""
        raise NotImplementedError(f"{self.qtype.name} is not a grid of integer codes")

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """A copy of ``q`` whose quant bits hold ``codes`` (integers in ``[lo, hi]``, shaped
        (n_blocks, block_size)); scales, mins and every other header field are left as they are.
        """
        raise NotImplementedError(f"{self.qtype.name} is not a grid of integer codes")

    def _checked_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``codes`` as int32 (n_blocks, block_size); CodecInputError on a bad shape or value."""
        qt = self.qtype
        assert self.code_range is not None
        lo, hi = self.code_range
        c = np.asarray(codes)
        if c.shape != (q.shape[0], qt.block_size):
            raise CodecInputError(
                f"{qt.name}: codes have shape {c.shape}, expected {(q.shape[0], qt.block_size)}"
            )
        if c.dtype.kind not in "iu":
            raise CodecInputError(f"{qt.name}: codes must be integers, got dtype {c.dtype}")
        if c.size:
            bad = (c < lo) | (c > hi)
            if bad.any():
                b, i = np.unravel_index(int(np.argmax(bad)), c.shape)
                raise CodecInputError(
                    f"{qt.name}: code {int(c[b, i])} at (block {b}, index {i}) is outside "
                    f"[{lo}, {hi}]"
                )
        return c.astype(np.int32, copy=False)

    def fast_kernel(self, weighted: bool) -> Callable[..., None] | None:
        """A compiled ``kernel(rows, imatrix, out)`` for whole rows, or None (numpy only).

        The kernel takes the imatrix (or an empty array when unweighted) and writes ``out``.
        """
        from qtool.kernels import _fast

        if not _fast.AVAILABLE:
            return None
        return _fast.KERNELS.get(self.qtype.name)

    # --- shared row handling ----------------------------------------------------------------

    def quantize_rows(self, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """float32 (r, n) -> uint8 (r, row_bytes) on the reference path.

        Types whose imatrix path needs statistics of the whole row override this.
        """
        qt = self.qtype
        r, n = rows.shape
        x = rows.reshape(-1, qt.block_size)
        if imatrix is not None and self.uses_imatrix:
            qw = np.broadcast_to(imatrix.reshape(1, -1), (r, n)).reshape(-1, qt.block_size)
            q = self.quantize_blocks_imatrix(x, qw)
        else:
            q = self.quantize_blocks(x)
        return q.reshape(r, -1)

    def quantize_part(
        self, rows: np.ndarray, imatrix: np.ndarray | None, sigma2: np.ndarray | None
    ) -> np.ndarray:
        """Blocks cut from longer rows (GPTQ fits one block at a time). Only the legacy types'
        imatrix weights look beyond a block (the row's mean square ``sigma2``); the others
        encode the blocks as they are."""
        return self.quantize(rows, imatrix)

    def _rows_per_chunk(self, n: int) -> int:
        return max(1, CHUNK_VALUES // n)

    def quantize(
        self,
        rows: np.ndarray,
        imatrix: np.ndarray | None,
        *,
        threads: int = 1,
        backend: str = "auto",
    ) -> np.ndarray:
        """Validated float32 (r, n) -> uint8 (r, row_bytes), chunked over rows and threads."""
        r, n = rows.shape
        out = np.empty((r, self.qtype.row_bytes(n)), np.uint8)
        weighted = imatrix is not None and self.uses_imatrix
        kernel = None if backend == "reference" else self.fast_kernel(weighted)
        if backend == "fast" and kernel is None:
            raise CodecInputError(f"{self.qtype.name}: no fast path (is numba installed?)")
        step = self._rows_per_chunk(n)
        if kernel is not None:
            # Compiled kernels are cheap per call; split rows evenly over the threads.
            step = max(1, min(step * 16, -(-r // max(1, threads))))
        spans = [(i, min(r, i + step)) for i in range(0, r, step)]

        def work(span: tuple[int, int]) -> None:
            a, b = span
            # Overflow/invalid steps are part of the C semantics we reproduce, not errors (and
            # numpy's error state is per thread, so it is set here, in the worker).
            with np.errstate(all="ignore"):
                work_span(a, b)

        def work_span(a: int, b: int) -> None:
            if kernel is not None:
                qw = imatrix if weighted else _EMPTY
                kernel(rows[a:b], qw, out[a:b])
            else:
                out[a:b] = self.quantize_rows(rows[a:b], imatrix if weighted else None)

        _run(work, spans, threads)
        return out

    def dequantize(self, data: np.ndarray, *, threads: int = 1) -> np.ndarray:
        """uint8 (r, row_bytes) -> float32 (r, n)."""
        qt = self.qtype
        r, nbytes = data.shape
        n = nbytes // qt.type_size * qt.block_size
        out = np.empty((r, n), np.float32)
        step = self._rows_per_chunk(n)
        spans = [(i, min(r, i + step)) for i in range(0, r, step)]

        def work(span: tuple[int, int]) -> None:
            a, b = span
            q = data[a:b].reshape(-1, qt.type_size)
            with np.errstate(all="ignore"):  # inf * 0 in a block with an overflowed scale
                out[a:b] = self.dequantize_blocks(q).reshape(b - a, n)

        _run(work, spans, threads)
        return out


_EMPTY = np.zeros(0, np.float32)


def _run(
    work: Callable[[tuple[int, int]], None], spans: list[tuple[int, int]], threads: int
) -> None:
    if threads <= 1 or len(spans) <= 1:
        for s in spans:
            work(s)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(spans))) as pool:
        for f in [pool.submit(work, s) for s in spans]:
            f.result()


def default_threads() -> int:
    """All the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
