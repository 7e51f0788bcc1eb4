"""Synthetic inputs for the codec tests: every kind of row that has tripped a quantizer."""

from __future__ import annotations

import numpy as np

N = 1024  # row length: a multiple of every block size
ROWS = 8


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _special_blocks(rng: np.random.Generator) -> np.ndarray:
    """Rows made of 32-value pieces chosen to hit edge cases of every block size."""
    pieces = [
        np.zeros(32),
        np.full(32, 0.75),
        np.full(32, -1.25),
        np.where(np.arange(32) == 7, 3.0, 0.0),
        np.where(np.arange(32) % 2 == 0, -0.0, 0.0),  # signed zeros
        np.where(np.arange(32) % 2 == 0, 0.5, -0.5),
        np.arange(32) * 0.5 - 8.0,  # on a grid: rounding ties everywhere
        np.round(rng.standard_normal(32) * 8) / 8,
        np.linspace(-1, 1, 32),
        np.full(32, 65504.0),
        np.where(np.arange(32) < 16, 1e-3, 2.0),
        rng.standard_normal(32) + 100.0,  # all positive, far from zero
        -np.abs(rng.standard_normal(32)) - 5.0,  # all negative
    ]
    rows = []
    for r in range(ROWS):
        order = rng.permutation(len(pieces))
        row = np.concatenate([pieces[i] for i in np.resize(order, N // 32)])
        if r % 2:  # whole 256-blocks of one kind too, for the k-quants
            row[:256] = 0.0
            row[256:512] = -2.5
        rows.append(row)
    return np.stack(rows)


def synthetic_cases() -> dict[str, np.ndarray]:
    """name -> float32 (ROWS, N) array."""
    rng = _rng(1234)
    normal = rng.standard_normal((ROWS, N))
    heavy = rng.standard_t(1.5, (ROWS, N)) * 0.02
    outliers = rng.standard_normal((ROWS, N)) * 0.02
    spots = rng.random((ROWS, N)) < 0.01
    outliers[spots] *= 100.0
    cases = {
        "normal": normal,
        "heavy_tailed": heavy,
        "outliers": outliers,
        "zero_constant_grid": _special_blocks(rng),
        "tiny_1e-12": rng.standard_normal((ROWS, N)) * 1e-12,
        "below_eps_1e-17": rng.standard_normal((ROWS, N)) * 1e-17,
        "subnormal_1e-40": rng.standard_normal((ROWS, N)) * 1e-40,
        "huge_1e6": rng.standard_normal((ROWS, N)) * 1e6,
        "huge_1e12": rng.standard_normal((ROWS, N)) * 1e12,
        "overflowing_1e15": rng.standard_normal((ROWS, N)) * 1e15,  # x**3 overflows float32
        "near_max_3e37": rng.standard_normal((ROWS, N)) * 3e37,
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in cases.items()}


def imatrix_for(n: int, seed: int = 7) -> np.ndarray:
    """A plausible importance matrix: mean squared activations, heavy-tailed, a few zeros."""
    rng = _rng(seed)
    im = rng.chisquare(1.0, n) * rng.lognormal(0.0, 1.0, n)
    im[rng.random(n) < 0.02] = 0.0
    return im.astype(np.float32)
