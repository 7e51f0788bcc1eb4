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
