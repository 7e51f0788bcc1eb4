"""``qtool eval`` end to end on a tiny random Llama (SmolLM2's tokenizer): self-KLD, F16 vs F32,
GGUF decoding, compressed-tensors, output formats, and every bad input with its exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama, with_tokenizer
from tests.evaluate.conftest import write_llama_gguf

DATA = "canterbury:alice29.txt"
FAST = ("--dataset", DATA, "--ctx", "64", "--chunks", "2", "--threads", "1")


def _eval(cli, *args: object) -> dict:
    r = cli("eval", *args, "--json")
    assert r.exit_code == 0, r.stderr
    return r.json()


def test_self_kld_is_zero_and_top1_is_100(cli, tiny_base: Path, tiny_copy: Path) -> None:
    d = _eval(cli, tiny_copy, tiny_base, "--base", tiny_base, *FAST)
    copy, same = d["artifacts"]
    for a in (copy, same):  # a second load of the same weights, and the base model itself
        assert a["kld"]["mean"] == 0.0 and a["kld"]["max"] == 0.0
        assert a["top1"] == 1.0 and a["delta_p_mean"] == 0.0
        assert a["ppl"] == d["base"]["ppl"] and a["delta_ppl"] == 0.0
    assert d["tokens"]["scored"] == 2 * 63 and d["settings"]["chunks"] == 2
    assert d["base"]["bits_per_weight"] == pytest.approx(32.0)


def test_f16_against_f32_is_tiny_but_not_zero(cli, tiny_base: Path, tiny_f16: Path) -> None:
    a = _eval(cli, tiny_f16, "--base", tiny_base, *FAST)["artifacts"][0]
    assert 0.0 < a["kld"]["mean"] < 1e-5, a["kld"]
    assert a["top1"] > 0.98
    assert a["bits_per_weight"] == pytest.approx(16.0)
    assert abs(a["delta_ppl"]) < 1e-3 * a["ppl"]


def test_gguf_f32_decodes_to_the_exact_weights(
    cli, tiny_base: Path, tiny_gguf_f32: Path, tiny_gguf_q8: Path
) -> None:
    """A GGUF written as llama.cpp's converter writes it (names, Q/K permutation) decodes back
    into the base architecture bit for bit: F32 gives KLD exactly 0; Q8_0 a small one."""
    f32, q8 = _eval(cli, tiny_gguf_f32, tiny_gguf_q8, "--base", tiny_base, *FAST)["artifacts"]
    assert f32["kind"] == "gguf" and f32["kld"]["max"] == 0.0 and f32["top1"] == 1.0
    assert 0.0 < q8["kld"]["mean"] < 1e-3
    assert q8["bits_per_weight"] == pytest.approx(8.5, abs=0.01)  # Q8_0: 34 bytes per 32


def test_compressed_tensors_artifact(cli, tiny_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")  # an optional loader; GGUF needs nothing extra
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    cfg = QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
    )
    apply_quantization_config(m, cfg)
    for mod in m.modules():  # min-max weight scales (what a calibration-free RTN does)
        if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
            g = mod.weight.data.reshape(mod.weight.shape[0], -1, 32)
            s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
            mod.weight_scale.data = s.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype)
            mod.weight_zero_point.data = z.reshape(mod.weight_zero_point.shape).to(
                mod.weight_zero_point.dtype
            )
    ModelCompressor.from_pretrained_model(m, quantization_format="pack-quantized").compress_model(m)
    out = tmp_path / "w4a16"
    m.save_pretrained(out)
    ModelCompressor.from_pretrained_model(m, quantization_format="pack-quantized").update_config(
        str(out)
    )
    a = _eval(cli, out, "--base", tiny_base, *FAST)["artifacts"][0]
    assert a["kind"] == "compressed-tensors"
    assert 0.0 < a["kld"]["mean"] < 0.5 and a["top1"] > 0.5
    assert a["bits_per_weight"] < 32.0


def test_table_json_and_plot(cli, tiny_base: Path, tiny_f16: Path, tmp_path: Path) -> None:
    png = tmp_path / "tradeoff.png"
    r = cli("eval", tiny_f16, "--base", tiny_base, *FAST, "--plot", png)
    assert r.exit_code == 0, r.stderr
    for col in ("artifact", "size", "bits/weight", "PPL", "ΔPPL", "KLD", "top-1"):
        assert col in r.stdout
    assert "(base)" in r.stdout and "eval" in r.stderr  # the progress bar is on stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("eval", tiny_f16, "--base", tiny_base, *FAST, "--json")
    d = json.loads(r.stdout)
    assert set(d["artifacts"][0]["kld"]) >= {"mean", "median", "p99", "max"}
    assert {"top1", "delta_p_mean", "delta_ppl", "size_bytes", "bits_per_weight"} <= set(
        d["artifacts"][0]
    )


def test_second_half_scoring(cli, tiny_base: Path, tiny_f16: Path) -> None:
    d = _eval(cli, tiny_f16, "--base", tiny_base, *FAST, "--scoring", "second-half")
    assert d["tokens"]["scored"] == 2 * (64 - 1 - 32)


# --- bad input --------------------------------------------------------------------------------


def _fails(cli, code: int, *args: object) -> str:
    r = cli("eval", *args)
    assert r.exit_code == code, (r.exit_code, r.stderr)
    error = r.stderr.strip().splitlines()[-1]  # info lines may come first; one error line
    assert r.stdout == "" and error.startswith("error: ")
    assert sum(line.startswith("error") for line in r.stderr.splitlines()) == 1
    return error


def test_other_vocabulary(cli, tiny_base: Path, tiny_llama: Path) -> None:
    err = _fails(cli, 2, tiny_llama, "--base", tiny_base, *FAST)
    assert "vocabulary of 1024 tokens" in err and "49152" in err


def test_other_tokenizer(cli, tiny_base: Path, tmp_path: Path) -> None:
    art = tmp_path / "swapped"
    shutil.copytree(tiny_base, art)
    tj = json.loads((art / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġand"] = vocab["Ġand"], vocab["Ġthe"]  # same size, other ids
    (art / "tokenizer.json").write_text(json.dumps(tj))
    err = _fails(cli, 2, art, "--base", tiny_base, *FAST)
    assert "different tokenizer" in err and "Ġthe" in err


def test_gguf_of_other_vocabularies(cli, tiny_base: Path, tiny_llama: Path, tmp_path) -> None:
    from transformers import AutoTokenizer

    small = write_llama_gguf(
        tiny_llama, tmp_path / "v1024.gguf", tokens=[f"<{i}>" for i in range(1024)]
    )
    assert "vocabulary of 1024 tokens" in _fails(cli, 2, small, "--base", tiny_base, *FAST)
    tokens = AutoTokenizer.from_pretrained(tiny_base).convert_ids_to_tokens(list(range(49152)))
    i, j = tokens.index("Ġthe"), tokens.index("Ġand")
    tokens[i], tokens[j] = tokens[j], tokens[i]
    swapped = write_llama_gguf(tiny_base, tmp_path / "swapped.gguf", tokens=tokens)
    err = _fails(cli, 2, swapped, "--base", tiny_base, *FAST)
    assert "different tokenizer" in err and f"token {min(i, j)}" in err


def test_dataset_shorter_than_a_window(cli, tiny_base: Path, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("Only a few words here.")
    err = _fails(cli, 2, tiny_base, "--base", tiny_base, "--dataset", tmp_path / "short.txt",
                 "--ctx", "64")  # fmt: skip
    assert "fewer than one window of --ctx 64" in err


def test_context_beyond_the_model(cli, tiny_base: Path) -> None:
    err = _fails(cli, 2, tiny_base, "--base", tiny_base, "--dataset", DATA, "--ctx", "4096")
    assert "--ctx 4096" in err and "2048" in err


def test_corrupt_gguf(cli, tiny_base: Path, tiny_gguf_q8: Path, tmp_path: Path) -> None:
    data = tiny_gguf_q8.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    err = _fails(cli, 2, tmp_path / "cut.gguf", "--base", tiny_base, *FAST)
    assert "truncated" in err and "cut.gguf" in err
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    assert "not a GGUF" in _fails(cli, 2, tmp_path / "junk.gguf", "--base", tiny_base, *FAST)


def test_missing_artifact_and_options(cli, tiny_base: Path) -> None:
    assert "no such file" in _fails(cli, 2, "/nope/model.gguf", "--base", tiny_base, *FAST)
    err = _fails(cli, 2, tiny_base, "--base", tiny_base, *FAST, "--scoring", "half")
    assert "--scoring half" in err


def test_gptq_config_without_gptq_tensors(cli, tiny_base: Path, tmp_path: Path) -> None:
    """GPTQ checkpoints load through qtool's unpacker when gptqmodel is absent (see
    tests/quantize/test_formats_gptq.py); a GPTQ config over dense tensors is a corrupt input."""
    art = tmp_path / "gptq"
    shutil.copytree(tiny_base, art)
    cfg = json.loads((art / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (art / "config.json").write_text(json.dumps(cfg))
    err = _fails(cli, 2, art, "--base", tiny_base, *FAST)
    assert "GPTQ" in err and "qweight" in err


def test_gguf_of_another_shape(cli, tiny_base: Path, tmp_path: Path, assets) -> None:
    other = make_tiny_llama(tmp_path / "deeper", dtype="float32", vocab_size=49152,
                            num_hidden_layers=3)  # fmt: skip
    gg = write_llama_gguf(with_tokenizer(other, assets), tmp_path / "deeper.gguf")
    err = _fails(cli, 2, gg, "--base", tiny_base, *FAST)
    assert "layers 3 differs from the base model's 2" in err


def test_quiet_bfloat16(cli, tiny_base: Path) -> None:
    r = cli("-q", "eval", tiny_base, "--base", tiny_base, "--dataset", DATA, "--ctx", "32",
            "--chunks", "1", "--dtype", "bfloat16")  # fmt: skip
    assert r.exit_code == 0 and r.stderr == ""  # -q: the table only, no logs or progress
    assert "tiny-f32 (base)" in r.stdout and "100.00%" in r.stdout
