"""export / quantize --method kquant: plan, bad input, atomic output, streaming memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export.helpers import build_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from measure import run_peak  # noqa: E402

TP = ("--tokenizer-pre", "smollm")  # the tiny model's cut tokenizer


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("cli") / "model", "llama", assets.smollm2_hf)


def one_line(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_dry_run_prints_plan_and_writes_nothing(cli, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    r = cli(
        "quantize",
        tiny,
        *TP,
        "--method",
        "kquant",
        "--type",
        "Q4_K_M",
        "-o",
        out,
        "--dry-run",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    data = r.json()
    assert not out.exists() and data["dry_run"]
    plan = data["outputs"][0]
    types = {t["name"]: t["grid"] for t in plan["tensors"]}
    assert types["output.weight"] == "Q6_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert plan["tensor_bytes"] == sum(t["bytes"] for t in plan["tensors"])
    human = cli("export", tiny, *TP, "--outtype", "Q8_0", "--dry-run")
    assert "plan: gguf" in human.stdout and "token_embd.weight" in human.stdout


def test_written_size_matches_plan(cli, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8.gguf"
    plan = cli("export", tiny, *TP, "--outtype", "Q8_0", "--dry-run", "--json").json()
    plan = plan["outputs"][0]
    r = cli("export", tiny, *TP, "--outtype", "Q8_0", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    done = r.json()["outputs"][0]
    assert done["bytes"] == out.stat().st_size
    assert plan["tensor_bytes"] < done["bytes"] < plan["tensor_bytes"] + 4 * 2**20
    assert [p.name for p in tmp_path.iterdir()] == ["q8.gguf"]


def test_unsupported_architecture(cli, tiny: Path, tmp_path: Path) -> None:
    for f in tiny.iterdir():
        shutil.copy(f, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = cli("export", tmp_path, *TP, "--outtype", "F16", "-o", tmp_path / "o.gguf")
    families = ["llama", "qwen2", "gemma2", "gemma3", "phi3", "olmo2", "granite", "smollm3"]
    one_line(r, 2, "'gpt_bigcode' is not supported", "supported: ", *families,
             "README 'Adding a model family'")  # fmt: skip
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert "\n### Adding a model family\n" in readme


def test_tokenizer_that_cannot_be_converted(cli, tiny: Path, tmp_path: Path) -> None:
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny / f, tmp_path)
    r = cli("export", tmp_path, *TP, "--outtype", "F16", "-o", tmp_path / "o.gguf")
    one_line(r, 2, "no tokenizer")
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "WordPiece", "vocab": {}}})
    )
    r = cli("export", tmp_path, *TP, "--outtype", "F16", "-o", tmp_path / "o.gguf")
    one_line(r, 2, "WordPiece", "cannot be converted")
    assert not (tmp_path / "o.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pure_with_rows_that_do_not_divide(cli, assets, tmp_path: Path) -> None:
    r = cli(
        "quantize",
        assets.smollm2_hf,
        "--method",
        "kquant",
        "--type",
        "Q4_K",
        "--pure",
        "-o",
        tmp_path / "o.gguf",
    )
    one_line(r, 2, "576", "Q4_K", "256", "--pure")


def test_imatrix_for_another_model(cli, tiny: Path, tmp_path: Path) -> None:
    import numpy as np

    from tests.export.helpers import write_imatrix

    other = tmp_path / "other.imatrix.gguf"
    write_imatrix(other, {"blk.0.attn_q.weight": np.ones(576, np.float32)})  # 576 != 256
    r = cli(
        "quantize",
        tiny,
        *TP,
        "--method",
        "kquant",
        "--type",
        "Q4_K_M",
        "--imatrix",
        other,
        "-o",
        tmp_path / "o.gguf",
    )
    one_line(r, 2, "another model")
    write_imatrix(other, {"model.layers.0.foo": np.ones(256, np.float32)})
    r = cli(
        "quantize",
        tiny,
        *TP,
        "--method",
        "kquant",
        "--type",
        "Q4_K_M",
        "--imatrix",
        other,
        "-o",
        tmp_path / "o.gguf",
    )
    one_line(r, 2, "none of its 1 entries")


def test_bad_type_and_missing_output(cli, tiny: Path, tmp_path: Path) -> None:
    one_line(cli("export", tiny, *TP, "--outtype", "Q7_K", "-o", tmp_path / "o.gguf"), 2, "Q7_K")
    one_line(cli("export", tiny, *TP, "--outtype", "Q4_K_M"), 2, "no output path")
    one_line(
        cli(
            "export",
            tiny,
            *TP,
            "--outtype",
            "F16",
            "--tensor-type",
            "attn_v=Q9",
            "-o",
            tmp_path / "o.gguf",
        ),
        2,
        "Q9",
    )
    one_line(cli("export", tiny, *TP, "--format", "onnx", "-o", tmp_path / "o"), 2, "onnx")


def test_full_disk_leaves_no_partial_file(cli, tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """The disk fills up in the middle of the tensor data (simulated at the file's write)."""
    import errno

    import qtool.formats.gguf as ge

    class FullDisk:
        def __init__(self, f) -> None:
            self.f, self.writes = f, 0

        def write(self, data) -> int:
            self.writes += 1
            if self.writes == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = ge._begin_tensor
    state: dict[str, FullDisk] = {}

    def begin(w, nbytes):
        f = real(w, nbytes)
        state.setdefault("f", FullDisk(f))
        return state["f"]

    monkeypatch.setattr(ge, "_begin_tensor", begin)
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous")
    one_line(cli("export", tiny, *TP, "--outtype", "F16", "-o", out), 1, "no space left")
    assert out.read_bytes() == b"previous"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]


def test_readonly_output_folder(cli, tiny: Path, tmp_path: Path, monkeypatch) -> None:
    import qtool.io

    real_access = os.access
    monkeypatch.setattr(
        qtool.io.os, "access", lambda p, m: False if m == os.W_OK else real_access(p, m)
    )
    one_line(
        cli("export", tiny, *TP, "--outtype", "F16", "-o", tmp_path / "o.gguf"), 2, "not writable"
    )
    assert list(tmp_path.iterdir()) == []


def _peak_rss_of_export(model: Path, out: Path, qtype: str) -> int:
    """Peak RSS (bytes) of a fresh `qtool export` process, its own (``scripts/measure.py``)."""
    cmd = [sys.executable, "-m", "qtool", "-q", "export", str(model), "--outtype", qtype,
           "-o", str(out), *TP]  # fmt: skip
    code, _wall, peak = run_peak(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert code == 0, cmd
    return peak


@pytest.mark.parametrize(
    "dims,layers,qtype,max_fraction",
    [
        ((1024, 4096, 8192), (2, 10), "F16", None),
        # 1B-shaped (Llama-3.2-1B-like widths, 16 layers = 1.2B parameters, 2.4 GB in bf16)
        pytest.param((2048, 8192, 32000), (4, 16), "Q8_0", 0.5, marks=pytest.mark.slow),
    ],
)
def test_memory_grows_with_largest_tensor_not_depth(
    assets, tmp_path: Path, dims, layers, qtype, max_fraction
) -> None:
    hidden, inter, vocab = dims
    rss, sizes = [], []
    for n in layers:
        model = build_tiny(
            tmp_path / f"m{n}",
            "llama",
            assets.smollm2_hf,
            hidden_size=hidden,
            intermediate_size=inter,
            vocab_size=vocab,
            num_hidden_layers=n,
            num_attention_heads=16,
            num_key_value_heads=8,
        )
        sizes.append((model / "model.safetensors").stat().st_size)
        rss.append(_peak_rss_of_export(model, tmp_path / f"m{n}.gguf", qtype))
        shutil.rmtree(model)
        (tmp_path / f"m{n}.gguf").unlink()
    grown_model, grown_rss = sizes[1] - sizes[0], rss[1] - rss[0]
    print(f"layers {layers}: model bytes {sizes}, export peak RSS {rss}")  # for the notes
    # One layer's tensors are a few tens of MB; the deeper model adds hundreds of MB on disk.
    assert grown_rss < 0.15 * grown_model, (rss, sizes)
    if max_fraction is not None:  # far below the model's size
        assert rss[1] < max_fraction * sizes[1], (rss, sizes)
