"""Recipes: every example in recipes/ runs on a tiny model, each output records its resolved
recipe, and running that recorded recipe again gives the same bytes. Bad recipes and
inapplicable flags fail with one line, exit code 2, and nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from qtool import api
from qtool.recipe import RecipeError, load, parse
from tests.conftest import REPO
from tests.export.helpers import build_tiny, llama_logits

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("recipes")
    return build_tiny(d / "model", "llama", assets.smollm2_hf)


def _digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file of a folder (by its path inside the folder)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _recorded(path: Path) -> dict:
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["qtool.recipe"]
        return json.loads(field.contents())
    return json.loads((path / "recipe.json").read_text())


def test_every_example_recipe_validates() -> None:
    assert len(RECIPES) >= 6
    for r in RECIPES:
        recipe = load(r)
        assert recipe.outputs


# the GPTQ recipes but the one with three outputs run in `make test-slow` (~60 s together)
SLOW_RECIPES = {"smoothquant-gptq", "gptq-w4a16-g128", "gptq-q4_k_m"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=[pytest.mark.slow] if p.stem in SLOW_RECIPES else []) for p in RECIPES],
    ids=[p.stem for p in RECIPES],
)
def test_example_recipe_runs_and_reproduces(tiny: Path, tmp_path: Path, path: Path) -> None:
    recipe = load(path)
    out = tmp_path / "first"
    out.mkdir()
    multi = len(recipe.outputs) > 1
    target = out if multi else out / ("model.gguf" if recipe.outputs[0].format == "gguf" else "m")
    if recipe.outputs[0].format == "gguf" and not multi:
        # the tiny model's cut tokenizer has no llama.cpp pre-tokenizer hash: name it
        data = recipe.to_dict()
        data["outputs"][0]["tokenizer_pre"] = "smollm"
        recipe = parse(data)
    elif multi:
        data = recipe.to_dict()
        for o in data["outputs"]:
            if o["format"] == "gguf":
                o["tokenizer_pre"] = "smollm"
        recipe = parse(data)
    res = api.quantize(str(tiny), recipe, output=target)
    written = [Path(o["path"]) for o in res.outputs]
    assert all(p.exists() for p in written)
    for p in written:
        if p.suffix == ".gguf":
            assert np.isfinite(llama_logits(p, [5, 6, 7, 8])).all()
        else:
            _loads_in_transformers(p)
    # the recorded recipe, fed back, reproduces every output byte for byte
    recorded = _recorded(written[0])
    assert recorded["recorded_output"] == 0
    recorded.pop("recorded_output")
    again = tmp_path / "again"
    again.mkdir()
    rec = parse(recorded)
    paths = [again / p.name for p in written]
    api.quantize(str(tiny), rec, output=paths)
    for a, b in zip(written, paths, strict=True):
        assert _digest(a) == _digest(b), a


def _loads_in_transformers(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qtool.checkpoint import open_checkpoint
    from qtool.evaluate.loaders import load_gptq_unpacked

    cfg = json.loads((path / "config.json").read_text())
    method = cfg["quantization_config"]["quant_method"]
    if method == "gptq":
        model = load_gptq_unpacked(open_checkpoint(str(path)), torch.float32, "cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


# --- bad recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,match",
    [
        ("outputs: [{format: gguf, type: Q4_K_M}]\nstagez: []", "stagez: unknown key"),
        ("outputs: [{format: gguf, type: Q4_K_M}]\nstages: [{method: awq}]", "unknown method"),
        ("outputs: [{format: gguf, type: Q9_K}]", "unknown type or preset"),
        ("outputs: [{format: onnx}]", "unknown format"),
        ("outputs: [{format: gptq, bits: 4, bogus: 1}]", r"outputs\[0\]\.bogus: unknown key"),
        ("stages: [{method: gptq, damp: 0}]\noutputs: [{format: gguf}]", "damp"),
        ("outputs: []", "outputs"),
        ("outputs: [{format: gguf}", "not valid YAML"),
        ("- a\n- b", "expected a mapping"),
        ("stages: [{transform: rotate}]\noutputs: [{format: gguf}]", "unknown transform"),
        ("stages: [{method: rtn, include: ['re:(']}]\noutputs: [{format: gguf}]", "regular"),
    ],
)
def test_bad_recipe_is_one_line(cli, tiny: Path, tmp_path: Path, text: str, match: str) -> None:
    r = tmp_path / "r.yaml"
    r.write_text(text)
    res = cli("quantize", tiny, "--recipe", r, "-o", tmp_path / "out.gguf")
    assert res.exit_code == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    import re

    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--type", "Q4_K_M", "--damp", "0.1"], "--damp applies to --method gptq"),
        (["--type", "Q4_K_M", "--bits", "4"], "--bits applies to integer outputs"),
        (["--bits", "4", "--imatrix", "x.gguf"], "--imatrix applies to GGUF output"),
        (["--type", "Q4_K_M", "-d", "canterbury"], "--dataset gives calibration data"),
        (["--method", "bitnet", "--clip", "mse"], "--clip does not apply to --method bitnet"),
        (["--bits", "4", "--act-static"], "--act-static quantizes activations"),
        (["--method", "awq", "--bits", "4"], "--method 'awq' is unknown"),
        (["--recipe", "RECIPE", "--bits", "4"], "--bits: the recipe sets the quantization"),
    ],
)
def test_inapplicable_flag_is_named(cli, tiny: Path, tmp_path: Path, args, match) -> None:
    args = [str(RECIPES[0]) if a == "RECIPE" else a for a in args]
    res = cli("quantize", tiny, *args, "-o", tmp_path / "out")
    assert res.exit_code == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not list(tmp_path.iterdir())


def test_pattern_matching_nothing_warns_and_strict_refuses(cli, tiny: Path, tmp_path: Path) -> None:
    r = tmp_path / "r.yaml"
    r.write_text(
        "stages: [{method: rtn, include: ['*attn_nothing*']}]\n"
        "outputs: [{format: gguf, type: Q8_0, tokenizer_pre: smollm}]\n"
    )
    res = cli("quantize", tiny, "--recipe", r, "-o", tmp_path / "o.gguf", "--dry-run")
    assert res.exit_code == 0 and "matches no tensor" in res.stderr
    r.write_text(r.read_text() + "strict: true\n")
    res = cli("quantize", tiny, "--recipe", r, "-o", tmp_path / "o.gguf")
    assert res.exit_code == 2 and "matches no tensor" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_flags_map_onto_recipe_fields() -> None:
    from qtool.recipe import from_options

    r = from_options(
        "x.gguf",
        method="gptq",
        type="Q4_K_M",
        dataset="canterbury",
        samples=8,
        act_order=True,
        static_groups=True,
        imatrix="calibration",
        tensor_type=["attn_v=Q8_0"],
    )
    d = r.to_dict()
    assert d["stages"][0]["method"] == "gptq" and d["stages"][0]["act_order"] is True
    assert d["outputs"][0]["type"] == "Q4_K_M" and d["outputs"][0]["imatrix"] == "calibration"
    assert d["outputs"][0]["tensor_types"] == [["attn_v", "Q8_0"]]
    assert d["calibration"]["samples"] == 8 and d["outputs"][0]["path"] == "x.gguf"
    r = from_options("o", method="gptq", bits=4, dataset="c")
    assert r.outputs[0].format == "gptq"
    r = from_options("o", bits=5)
    assert r.outputs[0].format == "compressed-tensors"
    with pytest.raises(RecipeError, match="say what to write"):
        from_options("o")
