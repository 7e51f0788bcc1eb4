"""The observers' accumulators against direct computation: the histogram against numpy's, the
clipping thresholds against the sample's percentile, outlier rows, and the Hessian accumulator's
row buffer against exact integer and float64 products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtool.observers.stats import (
    HessianAccumulator,
    InputAccumulator,
    StatsCollector,
    kl_threshold_from_hist,
    outlier_rows,
    percentile_from_hist,
)


def test_histogram_growth_is_exact() -> None:
    """Bins merge in pairs when the range doubles: same counts as one histogram at the end."""
    acc = InputAccumulator(8, torch.device("cpu"), bins=64, hessian=True)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(50, 8, generator=g) * s for s in (0.01, 0.3, 5.0, 40.0)]
    for x in xs:
        acc.update(x)
    allx = torch.cat(xs)
    assert acc.hist_range == 2.0 ** np.ceil(np.log2(float(allx.abs().max())))
    width = acc.hist_range / 64
    edges = np.arange(65) * width
    ref = np.zeros(64, dtype=np.int64)
    for x in xs:  # merging bin pairs on each doubling == binning everything at the final range
        ref += np.histogram(np.abs(x.numpy()).ravel(), bins=edges)[0]
    np.testing.assert_array_equal(acc.hist.numpy(), ref)
    h = (allx.double().T @ allx.double()).numpy()
    # float32 products per batch, float64 accumulation: 1e-6 of the largest entry
    np.testing.assert_allclose(acc.hessian.xtx().numpy(), h, rtol=0, atol=1e-6 * np.abs(h).max())


def test_percentile_and_kl_clipping() -> None:
    x = np.abs(np.random.default_rng(0).standard_normal(400_000)).astype(np.float32)
    rng = 8.0
    hist = np.histogram(x, bins=2048, range=(0, rng))[0]
    p = percentile_from_hist(hist, rng, 99.9)
    assert abs(p - np.percentile(x, 99.9)) < 2 * rng / 2048
    t = kl_threshold_from_hist(hist, rng, stride=8)
    assert 2.0 < t < 5.5  # entropy calibration clips a Gaussian well inside its max (~4.9)


def test_outlier_rows_flag_dominant_channels() -> None:
    col = StatsCollector(torch.device("cpu"))
    lin = torch.nn.Linear(64, 4)
    col.attach(lin, "blk.")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x[:, 7] *= 100
    lin(x)
    col.end_batch()
    stats = col.detach()
    (row,) = outlier_rows(stats.values(), factor=20, top=5)
    assert row["top_channel"] == 7 and row["outlier_channels"] == 1 and row["ratio"] > 20


@pytest.mark.parametrize("buffer_rows", [1, 64, 2048])
def test_buffered_hessian_rows_are_each_counted_once(buffer_rows: int) -> None:
    """Input rows wait in a buffer for one wide product (flushed when full, when a batch wider
    than it or of another dtype arrives, and at every group's end): with small integers every
    float32 partial sum is exact, so ``x^T x`` must equal the int64 product of all the rows,
    whatever the buffer's size and however the batches fall around it."""
    g = torch.Generator().manual_seed(5)
    cols = 300  # one column block: the lower triangle is filled from the upper
    acc = HessianAccumulator(cols, torch.device("cpu"), buffer_rows=buffer_rows)
    seen = []
    for k, (rows, dtype) in enumerate(
        [(37, torch.bfloat16), (40, torch.bfloat16), (100, torch.bfloat16), (5, torch.float32),
         (64, torch.bfloat16), (3, torch.bfloat16), (2100, torch.bfloat16), (11, torch.float32)]
    ):  # fmt: skip
        x = torch.randint(-8, 9, (rows, cols), generator=g)
        seen.append(x)
        acc.add(x.to(dtype).reshape(1, rows, cols))
        if k == 4:
            acc.end_group()
    allx = torch.cat(seen).to(torch.int64)
    assert acc.rows == allx.shape[0]
    assert torch.equal(acc.xtx().to(torch.int64), allx.T @ allx)


def test_buffered_hessian_matches_float64() -> None:
    """Real-valued bf16 activations over four column blocks (upper blocks computed, the rest
    mirrored): the accumulated ``x^T x`` is torch's float64 product to float32 accuracy."""
    g = torch.Generator().manual_seed(6)
    cols = 1100
    acc = HessianAccumulator(cols, torch.device("cpu"))
    xs = [(torch.randn(512, cols, generator=g) * 3).to(torch.bfloat16) for _ in range(9)]
    for k, x in enumerate(xs):
        acc.add(x)
        if k % 4 == 3:
            acc.end_group()
    x64 = torch.cat(xs).to(torch.float64)
    ref = x64.T @ x64
    got = acc.xtx().to(torch.float64)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(got, got.T)
