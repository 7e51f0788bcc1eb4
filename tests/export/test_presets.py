"""qtool's presets against llama-quantize: qtool quantizes the HF checkpoint, llama.cpp
quantizes qtool's F32 GGUF of it; every tensor must get the same type and the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qtool.policy import PRESETS
from tests.export.helpers import build_tiny, compare_files, llama_quantize, write_imatrix

TP = ("--tokenizer-pre", "smollm")  # the tiny models' cut tokenizer (see small_tokenizer)


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer Llama (so the more_bits layers differ from the others) and its F32 GGUF."""
    from qtool.cli.app import main

    d = tmp_path_factory.mktemp("presets")
    model = build_tiny(d / "model", "llama", assets.smollm2_hf, num_hidden_layers=4)
    f32 = d / "model-f32.gguf"
    with pytest.raises(SystemExit) as e:
        main(["-q", "export", str(model), "--outtype", "F32", "-o", str(f32), *TP])
    assert e.value.code == 0
    return model, f32


def check(cli, model: Path, f32: Path, tmp: Path, preset: str, *args: str, **ref_kw) -> None:
    ref, mine = tmp / "ref.gguf", tmp / "mine.gguf"
    llama_quantize(f32, ref, preset, **ref_kw)
    r = cli("-q", "quantize", model, "--method", "kquant", "--type", preset, "-o", mine, *args)
    assert r.exit_code == 0, r.stderr
    types, data = compare_files(ref, mine)
    assert not types, types
    assert not data, f"{len(data)} tensors differ in bytes: {data[:5]}"


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "F32"])
def test_preset_matches_llama_quantize(cli, tiny, tmp_path: Path, preset: str) -> None:
    check(cli, *tiny, tmp_path, preset, *TP)


@pytest.mark.parametrize("preset", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0", "Q5_K_S", "Q6_K", "Q4_1"])
def test_imatrix_matches_llama_quantize(cli, tiny, tmp_path: Path, preset: str) -> None:
    """The importance-weighted path: the same per-column weights given to llama.cpp through
    its C API and to qtool through an imatrix file (count 1, so in_sum2 is the weight)."""
    from gguf import GGUFReader

    rng = np.random.default_rng(1)
    imatrix = {
        t.name: rng.gamma(0.5, 2.0, int(t.shape[0])).astype(np.float32)
        for t in GGUFReader(str(tiny[1])).tensors
        if len(t.shape) == 2
    }
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, imatrix)
    check(cli, *tiny, tmp_path, preset, "--imatrix", path, *TP, imatrix=imatrix)


def test_overrides_match_llama_quantize(cli, tiny, tmp_path: Path) -> None:
    check(
        cli,
        *tiny,
        tmp_path,
        "Q4_K_M",
        "--tensor-type",
        "attn_v=Q8_0",
        "--tensor-type",
        r"blk\.1\.ffn_up=Q5_K",
        "--output-tensor-type",
        "Q5_K",
        "--token-embedding-type",
        "Q6_K",
        *TP,
        tensor_types=[("attn_v", "Q8_0"), (r"blk\.1\.ffn_up", "Q5_K")],
        output_type="Q5_K",
        token_embedding_type="Q6_K",
    )


def test_pure_matches_llama_quantize(cli, tiny, tmp_path: Path) -> None:
    check(cli, *tiny, tmp_path, "Q3_K_M", "--pure", *TP, pure=True)


SMOLLM2_DEFAULT = ["Q4_K_M"]  # the others (Q3_K_M included: 27 s) in `make test-slow`


@pytest.mark.parametrize(
    "preset",
    [
        pytest.param(p, marks=[] if p in SMOLLM2_DEFAULT else [pytest.mark.slow])
        for p in PRESETS
        if p != "F32"
    ],
)
def test_smollm2_preset_matches_llama_quantize(cli, assets, tmp_path: Path, preset: str) -> None:
    """The real model, whose 576-wide rows exercise the fallbacks (Q4_K -> Q5_0, ...)."""
    f32 = tmp_path / "f32.gguf"
    assert cli("-q", "export", assets.smollm2_hf, "--outtype", "F32", "-o", f32).exit_code == 0
    check(cli, assets.smollm2_hf, f32, tmp_path, preset)
