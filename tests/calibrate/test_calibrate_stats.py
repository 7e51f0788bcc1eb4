"""Statistics against direct computation, and layer-by-layer against a whole-model forward.

Tolerances (float32 compute on the CPU):
- hooks vs an explicit forward that records every linear input and computes the statistics
  with numpy in float64: sums of squares to 1e-5 relative, min/max/absmax exact (float32),
  histograms exact, token counts exact;
- layer-by-layer vs a whole-model forward (same batches): identical numbers (the same
  float32 kernels run on the same inputs); checked to 1e-6 relative to allow other BLAS builds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.calibrate.stats import (
    HessianAccumulator,
    InputAccumulator,
    StatsCollector,
    kl_threshold_from_hist,
    outlier_rows,
    percentile_from_hist,
)
from qtool.checkpoint import open_checkpoint
from qtool.runner.layers import calibrate_layerwise, collect_whole_model


def _ids(n: int = 3, seq: int = 64, vocab: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_model(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@pytest.fixture(scope="module")
def layerwise(tiny_llama: Path):
    return calibrate_layerwise(open_checkpoint(str(tiny_llama)), _ids(), batch_size=2)


def test_hooks_match_an_explicit_forward(tiny_model, layerwise) -> None:
    recorded: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in tiny_model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def rec(_m, args, name=name):
                recorded.setdefault(name, []).append(
                    args[0].detach().reshape(-1, args[0].shape[-1])
                )

            handles.append(mod.register_forward_pre_hook(rec))
    with torch.no_grad():
        for b in _ids().split(2):
            tiny_model(input_ids=b)
    for h in handles:
        h.remove()
    stats = layerwise.stats
    assert set(stats) == set(recorded)
    for name, xs in recorded.items():
        x = torch.cat(xs).double().numpy()
        st = stats[name]
        assert st.count == x.shape[0] == 3 * 64
        np.testing.assert_allclose(st.sum_sq, (x**2).sum(0), rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(st.min, x.min(0).astype(np.float32))
        np.testing.assert_array_equal(st.max, x.max(0).astype(np.float32))
        np.testing.assert_array_equal(st.absmax, np.abs(x).max(0).astype(np.float32))
        a = np.abs(x.astype(np.float32)).ravel()
        idx = np.minimum(
            (a * np.float32(st.hist.size / st.hist_range)).astype(np.int64), st.hist.size - 1
        )
        np.testing.assert_array_equal(st.hist, np.bincount(idx, minlength=st.hist.size))
        assert st.hist_range >= a.max() > st.hist_range / 2


def test_layerwise_equals_whole_model(tiny_model, layerwise) -> None:
    whole = collect_whole_model(tiny_model, _ids(), batch_size=2)
    for name, st in layerwise.stats.items():
        ref = whole[name]
        np.testing.assert_allclose(st.sum_sq, ref.sum_sq, rtol=1e-6, atol=0)
        np.testing.assert_allclose(st.absmax, ref.absmax, rtol=1e-6, atol=0)
        np.testing.assert_allclose(st.min, ref.min, rtol=1e-6, atol=0)
        np.testing.assert_allclose(st.max, ref.max, rtol=1e-6, atol=0)
        if name != "lm_head":  # the layer-by-layer path never computes the logits
            np.testing.assert_allclose(st.out_absmax, ref.out_absmax, rtol=1e-6, atol=0)
        assert st.count == ref.count


def test_shared_inputs_are_measured_once(layerwise) -> None:
    s = layerwise.stats
    assert (
        s["model.layers.0.self_attn.k_proj"].shares_input_with == "model.layers.0.self_attn.q_proj"
    )
    assert (
        s["model.layers.0.self_attn.v_proj"].shares_input_with == "model.layers.0.self_attn.q_proj"
    )
    assert s["model.layers.1.mlp.up_proj"].shares_input_with == "model.layers.1.mlp.gate_proj"
    assert s["model.layers.1.mlp.down_proj"].shares_input_with is None
    np.testing.assert_array_equal(
        s["model.layers.0.self_attn.k_proj"].sum_sq, s["model.layers.0.self_attn.q_proj"].sum_sq
    )
    # output ranges are per layer, not shared
    assert s["model.layers.0.self_attn.k_proj"].out_absmax.shape == (128,)
    assert s["model.layers.0.self_attn.q_proj"].out_absmax.shape == (256,)


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


@pytest.mark.slow
def test_layerwise_equals_whole_model_gemma3(assets) -> None:
    """Gemma 3: sliding and global layers with their own masks and rotary tables, scaled
    embeddings. The per-layer arguments the stubs record must reproduce the full forward."""
    from transformers import AutoModelForCausalLM

    assert assets.gemma3_hf is not None, "Gemma 3 assets missing: run `make assets-gemma`"
    ids = _ids(2, 640, vocab=262144)  # longer than the 512-token sliding window
    lw = calibrate_layerwise(open_checkpoint(str(assets.gemma3_hf)), ids, batch_size=1)
    model = AutoModelForCausalLM.from_pretrained(
        assets.gemma3_hf, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    whole = collect_whole_model(model, ids, batch_size=1)
    assert set(lw.stats) == set(whole)
    for name, st in lw.stats.items():
        np.testing.assert_allclose(st.sum_sq, whole[name].sum_sq, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(st.absmax, whole[name].absmax, rtol=1e-5, err_msg=name)


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
