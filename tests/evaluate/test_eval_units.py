"""Pieces of ``qtool eval`` without a model: datasets, windows, metrics, decoding transforms,
the fast GGUF header reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.errors import BadInputError, CorruptFileError
from qtool.evaluate.data import make_windows, resolve_dataset, scored_positions
from qtool.evaluate.gguf_header import read_gguf_header
from qtool.evaluate.metrics import CompareStats, PerplexityStats, base_slice, update_compare
from qtool.models.llama import unpermute_qk
from tests.conftest import Assets
from tests.evaluate.conftest import llama_permute

# --- datasets and windows ---------------------------------------------------------------------


def test_dataset_file_folder_and_canterbury(tmp_path: Path, assets: Assets) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert resolve_dataset(str(tmp_path)).text == "first\n\nsecond"
    assert resolve_dataset(str(tmp_path / "b.txt")).text == "second"
    d = resolve_dataset("canterbury:alice29.txt")
    assert d.files == (assets.canterbury / "alice29.txt",) and "Alice" in d.text


@pytest.mark.parametrize(
    "spec, words",
    [
        ("canterbury:nope.txt", ["nope.txt", "alice29.txt"]),
        ("/no/such/file.txt", ["no such file", "canterbury:FILE"]),
    ],
)
def test_dataset_errors_name_the_value(spec: str, words: list[str], assets: Assets) -> None:
    with pytest.raises(BadInputError) as e:
        resolve_dataset(spec)
    assert all(w in str(e.value) for w in words)


def test_dataset_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(BadInputError, match="not UTF-8"):
        resolve_dataset(str(tmp_path / "x.txt"))


def test_windows_like_llama_perplexity() -> None:
    tokens = np.arange(10, 30)
    w, available = make_windows(tokens, 8, None, bos_id=1)
    assert available == 2 and w.shape == (2, 8)
    # perplexity.cpp: consecutive windows, the first token of each replaced by BOS
    assert w[0].tolist() == [1, 11, 12, 13, 14, 15, 16, 17]
    assert w[1].tolist() == [1, 19, 20, 21, 22, 23, 24, 25]
    w, _ = make_windows(tokens, 8, 1, bos_id=None)
    assert w.tolist() == [list(range(10, 18))]
    with pytest.raises(BadInputError, match="fewer than one window of --ctx 64"):
        make_windows(tokens, 64, None, None)


def test_scored_positions() -> None:
    assert scored_positions(512, "full") == (0, 511)
    # perplexity.cpp: first = n_ctx/2, n_ctx - 1 - first predictions per window
    first, last = scored_positions(512, "second-half")
    assert (first, last - first) == (256, 255)


# --- metrics ----------------------------------------------------------------------------------


def _reference_kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def logsm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lp, lq = logsm(p_logits), logsm(q_logits)
    with np.errstate(invalid="ignore"):  # -inf - -inf in masked rows: nan, handled by callers
        return (np.exp(lp) * (lp - lq)).sum(-1)


def _run_metrics(base: torch.Tensor, art: torch.Tensor, y: torch.Tensor, cut: int):
    ppl, st = PerplexityStats(), CompareStats()
    for a, b in ((0, cut), (cut, len(y))):  # two slices, as the engine feeds them
        update_compare(st, base_slice(ppl, base[a:b], y[a:b]), art[a:b], y[a:b])
    return ppl, st.summary()


@pytest.mark.parametrize("scale", [1e-3, 0.3, 3.0])
def test_metrics_against_float64_log_softmax(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 5000, generator=g) * 3
    art = base + scale * torch.randn(40, 5000, generator=g)
    y = torch.randint(0, 5000, (40,), generator=g)
    ppl, s = _run_metrics(base, art, y, 25)
    ref = _reference_kld(base.numpy(), art.numpy())
    # float32 products summed in float64: ~1e-5 relative where KLD is ~1e-6, better above
    assert s["kld"]["mean"] == pytest.approx(ref.mean(), rel=1e-4)
    assert s["kld"]["p99"] == pytest.approx(np.percentile(ref, 99), rel=1e-4)
    assert s["kld"]["max"] == pytest.approx(ref.max(), rel=1e-4)
    lb = torch.log_softmax(base.double(), -1)
    la = torch.log_softmax(art.double(), -1)
    rows = torch.arange(40)
    assert ppl.ppl == pytest.approx(math.exp(-lb[rows, y].mean().item()), rel=1e-7)
    assert s["ppl"] == pytest.approx(math.exp(-la[rows, y].mean().item()), rel=1e-7)
    top1 = (base.argmax(-1) == art.argmax(-1)).double().mean().item()
    assert s["top1"] == pytest.approx(top1)
    dp = (la.exp() - lb.exp())[rows, y].mean().item()
    assert s["delta_p_mean"] == pytest.approx(dp, rel=1e-5, abs=1e-12)
    assert s["tokens"] == 40


def test_metrics_far_apart_and_infinite_logits() -> None:
    """Where the artifact's logits exceed the base's by far, or are -inf, the float64 path
    takes the rows over: still finite, still the reference values."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 300, generator=g)
    art = base.clone()
    art[:4, 7] += 80.0  # the artifact bets everything on token 7 where the base does not
    base[6, 3] = -math.inf  # a masked logit in the base
    art[6, 3] = -math.inf
    y = torch.randint(0, 300, (8,), generator=g)
    _, s = _run_metrics(base, art, y, 5)
    ref = _reference_kld(base.numpy(), art.numpy())
    ref[6] = 0.0  # identical rows; numpy's -inf - -inf is nan
    assert np.isfinite(s["kld"]["max"])
    assert s["kld"]["mean"] == pytest.approx(np.nanmean(ref), rel=1e-9)


def test_identical_logits_give_exactly_zero() -> None:
    x = torch.randn(16, 1000)
    y = torch.randint(0, 1000, (16,))
    ppl, s = _run_metrics(x, x.clone(), y, 9)
    assert s["kld"]["max"] == 0.0 and s["kld"]["mean"] == 0.0
    assert s["top1"] == 1.0 and s["delta_p_mean"] == 0.0 and s["ppl"] == ppl.ppl


# --- GGUF decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_head, n_kv", [(4, 4), (9, 3), (4, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, n_kv: int) -> None:
    head_dim, hidden = 8, 24
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_permute(q, n_head, n_head), n_head), q)
    assert np.array_equal(unpermute_qk(llama_permute(k, n_head, n_kv), n_kv), k)


def test_fast_header_equals_gguf_py(assets: Assets) -> None:
    from tests.gguf_reference import gguf_py_read as read_gguf

    meta, tensors = read_gguf_header(assets.smollm2_gguf)
    ref_meta, ref_tensors = read_gguf(assets.smollm2_gguf)
    assert meta == ref_meta
    assert tensors == ref_tensors


def test_fast_header_refuses_damage(tmp_path: Path, assets: Assets) -> None:
    data = assets.smollm2_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_gguf_header(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:5000])
    with pytest.raises(CorruptFileError, match="truncated GGUF header"):
        read_gguf_header(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + b"\xff" * 64)
    with pytest.raises(CorruptFileError):
        read_gguf_header(tmp_path / "junk.gguf")


def test_table_labels(tmp_path: Path) -> None:
    from qtool.evaluate.report import short_labels

    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "a").mkdir(parents=True)
    a, ba = str(tmp_path / "a"), str(tmp_path / "b" / "a")
    assert short_labels([a, a, "org/model"]) == ["a", "a", "org/model"]
    assert short_labels([a, ba]) == [a, ba]  # same name, different files: full paths
