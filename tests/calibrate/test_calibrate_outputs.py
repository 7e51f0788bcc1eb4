"""The stats file (load_stats and its model check) and the llama.cpp imatrix formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.calibrate.imatrix import load_imatrix, save_imatrix
from qtool.calibrate.pipeline import CalibrateOptions, calibrate, imatrix_of, prepare
from qtool.errors import BadInputError, CorruptFileError
from qtool.observers.statsfile import StatsMismatchError, load_stats, save_stats
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def cal(tiny_tok: Path):
    opts = CalibrateOptions(dataset="canterbury", samples=2, seq_len=64, device="cpu")
    return calibrate(prepare(str(tiny_tok), opts), opts)


@pytest.fixture(scope="module")
def stats_file(cal, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "s.safetensors"
    save_stats(path, cal)
    return path


def test_roundtrip_and_metadata(cal, stats_file: Path, tiny_tok: Path) -> None:
    got = load_stats(stats_file, expected_model=str(tiny_tok))
    assert set(got.layers) == set(cal.layers)
    for name, st in cal.layers.items():
        g = got.layers[name]
        np.testing.assert_allclose(g.sum_sq, st.sum_sq, rtol=1e-7)
        np.testing.assert_array_equal(g.absmax, st.absmax)
        np.testing.assert_array_equal(g.hist, st.hist)
        assert g.count == st.count == 128 and g.shares_input_with == st.shares_input_with
    m = got.meta
    assert m["tokens_seen"] == 128 and m["model"]["n_layers"] == 2
    assert m["dataset"]["spec"] == "canterbury" and len(m["dataset"]["tokens_sha256"]) == 64
    assert got["blk.0.attn_q.weight"] is got.layers["model.layers.0.self_attn.q_proj"]
    assert got.importance("blk.1.ffn_down.weight").shape == (512,)


def test_another_model_is_refused(stats_file: Path, tmp_path: Path) -> None:
    other = make_tiny_llama(tmp_path / "wider", vocab_size=49152, intermediate_size=768)
    with pytest.raises(StatsMismatchError, match=r"another model .*intermediate 512 vs 768") as e:
        load_stats(stats_file, expected_model=str(other))
    assert e.value.exit_code == 2 and "qtool calibrate" in str(e.value)


def test_same_shapes_other_weights_are_refused(
    stats_file: Path, tiny_tok: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    twin = tmp_path / "twin"
    shutil.copytree(tiny_tok, twin)
    w = load_file(twin / "model.safetensors")
    w = {k: v + 0.05 * torch.randn_like(v.float()).to(v.dtype) for k, v in w.items()}
    save_file(w, twin / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StatsMismatchError, match="weights differ"):
        load_stats(stats_file, expected_model=str(twin))
    assert load_stats(stats_file, expected_model=str(twin), strict=False).tokens == 128
    # the same model in another dtype is the same model
    f32 = tmp_path / "f32"
    shutil.copytree(tiny_tok, f32)
    save_file(
        {k: v.float() for k, v in load_file(tiny_tok / "model.safetensors").items()},
        f32 / "model.safetensors",
        metadata={"format": "pt"},
    )
    load_stats(stats_file, expected_model=str(f32))


def test_bad_stats_files(tmp_path: Path, tiny_tok: Path) -> None:
    with pytest.raises(BadInputError, match="no such stats file"):
        load_stats(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CorruptFileError):
        load_stats(tmp_path / "junk.safetensors")
    with pytest.raises(BadInputError, match="not a qtool stats file"):
        load_stats(tiny_tok / "model.safetensors")


def test_gguf_imatrix_layout(cal, tmp_path: Path) -> None:
    """What llama-imatrix writes (tools/imatrix/imatrix.cpp save_imatrix): imatrix.* keys,
    `<weight>.in_sum2` [n_in, 1] and `<weight>.counts` [1, 1], F32, weights sorted by name."""
    from gguf import GGMLQuantizationType, GGUFReader

    im = imatrix_of(cal)
    path = tmp_path / "m.imatrix.gguf"
    save_imatrix(path, im)
    r = GGUFReader(str(path))
    keys = set(r.fields)
    assert {"general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= keys
    names = [t.name for t in r.tensors]
    assert len(names) == 2 * 7 * 2  # 7 weights x 2 layers, 2 tensors each
    weights = names[::2]  # llama-imatrix: sorted weight names, in_sum2 then counts
    assert weights == sorted(weights) and all(n.endswith(".in_sum2") for n in weights)
    assert names[1::2] == [w.replace(".in_sum2", ".counts") for w in weights]
    assert "output.weight.in_sum2" not in names  # like llama-imatrix without --process-output
    t = {x.name: x for x in r.tensors}
    q = t["blk.0.attn_q.weight.in_sum2"]
    assert list(q.shape) == [256, 1] and q.tensor_type == GGMLQuantizationType.F32
    assert list(t["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    assert float(t["blk.0.attn_q.weight.counts"].data[0, 0]) == 128
    np.testing.assert_allclose(
        np.asarray(q.data).ravel(), cal.layers["model.layers.0.self_attn.q_proj"].sum_sq, rtol=1e-6
    )
    back = load_imatrix(path)
    assert back.datasets == ["canterbury"] and back.chunk_count == 2 and back.chunk_size == 64
    assert set(back.entries) == set(im.entries)
    assert set(imatrix_of(cal, include_output=True).entries) - set(im.entries) == {"output.weight"}


def test_legacy_dat_imatrix(cal, tmp_path: Path) -> None:
    im = imatrix_of(cal)
    save_imatrix(tmp_path / "m.dat", im)
    back = load_imatrix(tmp_path / "m.dat")
    assert back.chunk_count == 2 and back.datasets == ["canterbury"]
    for name, e in im.entries.items():
        np.testing.assert_allclose(back.entries[name].importance, e.importance, rtol=1e-6)


def test_stats_json_is_complete(stats_file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(stats_file), framework="numpy") as f:
        meta = json.loads(f.metadata()["qtool.calibration"])
        keys = set(f.keys())
    assert meta["format"] == "qtool.calibration" and meta["version"] == 1
    assert meta["layers"]["model.layers.0.self_attn.q_proj"]["gguf"] == "blk.0.attn_q.weight"
    for suffix in (
        "in_sum_sq",
        "in_count",
        "in_absmax",
        "in_min",
        "in_max",
        "in_hist",
        "in_hist_range",
        "out_absmax",
        "out_range",
    ):
        assert f"model.layers.0.mlp.down_proj.{suffix}" in keys
    assert "lm_head.in_sum_sq" in keys and "lm_head.out_absmax" not in keys


def test_hessian_is_stored_once_per_input(tiny_tok: Path, tmp_path: Path) -> None:
    opts = CalibrateOptions(dataset="canterbury", samples=1, seq_len=32, device="cpu", hessian=True)
    save_stats(tmp_path / "h.safetensors", calibrate(prepare(str(tiny_tok), opts), opts))
    got = load_stats(tmp_path / "h.safetensors")
    q = got.layers["model.layers.0.self_attn.q_proj"]
    assert q.hessian is not None and q.hessian.shape == (256, 256)
    assert got.layers["model.layers.0.self_attn.k_proj"].hessian is None  # shares q_proj's
    assert got.layers["model.layers.0.mlp.down_proj"].hessian.shape == (512, 512)
    # the diagonal of Σ x xᵀ is Σ x²
    np.testing.assert_allclose(np.diag(q.hessian), q.sum_sq, rtol=1e-5)
