"""A GGUF file as a source: requantized exactly as llama-quantize requantizes it, calibrated and
GPTQ-quantized like any checkpoint; and the GGUF plan's generated and merged tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qtool import api
from tests.export.helpers import build_tiny, compare_files, llama_logits, llama_quantize

TP = ("--tokenizer-pre", "smollm")


@pytest.fixture(scope="module")
def f16(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gguf-src")
    model = build_tiny(d / "model", "llama", assets.smollm2_hf, num_hidden_layers=4)
    out = d / "model-f16.gguf"
    api.export(str(model), type="F16", output=out, tokenizer_pre="smollm")
    return out


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M", "Q8_0", "Q5_0"])
def test_gguf_source_requantizes_like_llama_quantize(
    cli, f16: Path, tmp_path: Path, preset: str
) -> None:
    ref, mine = tmp_path / "ref.gguf", tmp_path / "mine.gguf"
    llama_quantize(f16, ref, preset)
    r = cli("quantize", f16, "--type", preset, "-o", mine)
    assert r.exit_code == 0, r.stderr
    types, data = compare_files(ref, mine)
    assert not types, types
    assert not data, f"{len(data)} tensors differ in bytes: {data[:5]}"


def test_requantizing_a_quantized_file_warns(cli, f16: Path, tmp_path: Path) -> None:
    q8 = tmp_path / "q8.gguf"
    assert cli("quantize", f16, "--type", "Q8_0", "-o", q8).exit_code == 0
    r = cli("quantize", q8, "--type", "Q4_K_M", "-o", tmp_path / "q4.gguf")
    assert r.exit_code == 0 and "already quantized" in r.stderr and "Q8_0" in r.stderr


def test_gptq_from_a_gguf_source(cli, f16: Path, tmp_path: Path) -> None:
    """Calibration and GPTQ run on the GGUF's decoded weights (HF layout, HF names); the
    output's rows go back to llama.cpp's order and llama.cpp runs the file."""
    out = tmp_path / "gptq.gguf"
    r = cli("quantize", f16, "--method", "gptq", "--type", "Q4_K_M", "-d", "canterbury",
            "-n", "8", "-L", "64", "-o", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    o = r.json()["outputs"][0]
    assert o["methods"]["gptq"] == 28 and o["types"]["Q4_K"] >= 1
    ref = tmp_path / "ref.gguf"
    llama_quantize(f16, ref, "Q4_K_M")
    types, _ = compare_files(ref, out)
    assert not types
    ids = [5, 17, 230, 9, 999, 42, 7, 311]
    got, base = llama_logits(out, ids), llama_logits(f16, ids)
    assert np.isfinite(got).all()
    # a wrong row order on q/k would leave noise: GPTQ's file stays close to the F16 model
    assert np.abs(got - base).mean() < 0.2 * np.abs(base).mean() + 0.05


# --- generated and merged tensors -------------------------------------------------------------


def test_plan_generates_and_merges_tensors(assets, tmp_path: Path) -> None:
    """A family whose GGUF has a tensor generated from the config (0 -> 1) and one merged from
    two HF tensors (N -> 1): the plan knows both from headers, the writer streams them, and
    llama.cpp's reader (gguf-py) finds the values."""
    from gguf import GGUFReader

    from qtool.checkpoint import open_checkpoint
    from qtool.formats.gguf import make_plan, write_gguf
    from qtool.models.base import GGUFTensor
    from qtool.models.llama import Llama

    model = build_tiny(tmp_path / "m", "llama", assets.smollm2_hf)

    class Merging(Llama):
        hf_types = ()  # not registered

        def gguf_tensors(self, tensors):
            base = super().gguf_tensors(tensors)
            gate = "model.layers.0.mlp.gate_proj.weight"
            up = "model.layers.0.mlp.up_proj.weight"

            def stack(parts):
                yield from parts  # one source at a time: a row chunk each

            rows = tensors[gate].shape[0] + tensors[up].shape[0]
            merged = GGUFTensor(
                "blk.0.ffn_gate_up_test.weight", (rows, tensors[gate].shape[1]), (gate, up), stack
            )

            def ones(_parts):
                yield np.arange(8, dtype=np.float32)

            made = GGUFTensor("test_generated.weight", (8,), (), ones, float_only=True)
            return [*base, merged, made]

    ckpt = open_checkpoint(str(model))
    fam = Merging(ckpt.config, ckpt.root)
    plan = make_plan(ckpt, fam, "Q8_0")
    names = {e.name: e for e in plan.entries}
    assert names["blk.0.ffn_gate_up_test.weight"].qtype == "Q8_0"
    assert names["test_generated.weight"].qtype == "F32"
    out = tmp_path / "m.gguf"
    write_gguf(out, plan, ckpt, fam, tokenizer_pre="smollm")
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert np.array_equal(np.asarray(tensors["test_generated.weight"].data), np.arange(8))
    from gguf.quants import dequantize

    t = tensors["blk.0.ffn_gate_up_test.weight"]
    got = dequantize(np.asarray(t.data), t.tensor_type).reshape(1024, 256)
    gate = ckpt.read("model.layers.0.mlp.gate_proj.weight").float().numpy()
    up = ckpt.read("model.layers.0.mlp.up_proj.weight").float().numpy()
    want = np.concatenate([gate, up])
    assert np.abs(got - want).max() <= np.abs(want).max() / 127 + 1e-6  # Q8_0 rounding
