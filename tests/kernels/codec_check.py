"""Block-by-block comparison with a useful failure message."""

from __future__ import annotations

import numpy as np
from qtool.kernels.types import QuantType


def assert_same_blocks(ours: np.ndarray, ref: np.ndarray, qt: QuantType, label: str) -> int:
    """Assert identical bytes; on mismatch say how many blocks differ and where. Returns blocks."""
    assert ours.shape == ref.shape, f"{label}: shape {ours.shape} != llama.cpp's {ref.shape}"
    a = ours.reshape(ref.shape[0], -1, qt.type_size)
    b = ref.reshape(ref.shape[0], -1, qt.type_size)
    bad = (a != b).any(axis=2)
    if bad.any():
        where = np.argwhere(bad)
        r, k = where[0]
        byte_idx = np.flatnonzero(a[r, k] != b[r, k])
        raise AssertionError(
            f"{label}: {int(bad.sum())} of {bad.size} {qt.name} blocks differ from llama.cpp; "
            f"first at (row, block) {[tuple(map(int, w)) for w in where[:8]]}; "
            f"block ({r}, {k}) differs at bytes {byte_idx[:12].tolist()}: "
            f"ours {a[r, k][byte_idx[:12]].tolist()} vs llama.cpp {b[r, k][byte_idx[:12]].tolist()}"
        )
    return bad.size


def assert_same_floats(ours: np.ndarray, ref: np.ndarray, label: str) -> None:
    """Bit-identical float32 (NaN payloads included)."""
    assert ours.shape == ref.shape, f"{label}: shape {ours.shape} != {ref.shape}"
    bad = ours.view(np.uint32) != ref.view(np.uint32)
    if bad.any():
        where = np.argwhere(bad)[:5]
        raise AssertionError(
            f"{label}: {int(bad.sum())} of {bad.size} values differ; first at "
            f"{[tuple(map(int, w)) for w in where]}: ours {ours[tuple(where[0])]!r} vs "
            f"{ref[tuple(where[0])]!r}"
        )
