"""``qtool calibrate`` end to end: outputs, --json, and bad input (clear message, exit code,
nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool.calibrate.imatrix import load_imatrix
from qtool.observers.statsfile import load_stats


def test_calibrate_writes_stats_and_imatrix(cli, tiny_tok: Path, tmp_path: Path) -> None:
    stats, im = tmp_path / "s.safetensors", tmp_path / "m.imatrix.gguf"
    r = cli(
        "calibrate",
        tiny_tok,
        "-d",
        "canterbury",
        "-n",
        3,
        "-L",
        64,
        "-o",
        stats,
        "--imatrix",
        im,
        "--top",
        3,
    )
    assert r.exit_code == 0, r.stderr
    assert "Most outlier-heavy inputs" in r.stdout and "tokens sha256" in r.stdout
    assert "eta" in r.stderr  # progress on stderr (one line per stage when not a terminal)
    cal = load_stats(stats, expected_model=str(tiny_tok))
    assert cal.tokens == 192 and cal.meta["dataset"]["samples"] == 3
    assert len(load_imatrix(im).entries) == 14


def test_calibrate_json(cli, tiny_tok: Path, tmp_path: Path) -> None:
    r = cli(
        "calibrate",
        tiny_tok,
        "-d",
        "canterbury",
        "-n",
        2,
        "-L",
        32,
        "-o",
        tmp_path / "s.safetensors",
        "--seed",
        3,
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)  # the whole of stdout is one document
    assert d["tokens_seen"] == 64 and d["dataset"]["seed"] == 3 and d["linear_layers"] == 15
    # distinct inputs: 4 per layer (qkv, o, gate/up, down) x 2 + lm_head
    assert len(d["outliers"]) == 9 and {"layer", "ratio", "outlier_channels"} <= set(
        d["outliers"][0]
    )
    assert d["imatrix_file"] is None


def _bad(cli, tmp_path: Path, *args: object) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    r = cli("calibrate", *args, "-o", out / "s.safetensors", "--imatrix", out / "m.gguf")
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file
    return r.stderr


def test_bad_inputs(cli, tiny_tok: Path, tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    assert "no text" in _bad(cli, tmp_path, tiny_tok, "-d", tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("Too short. " * 30)
    err = _bad(cli, tmp_path, tiny_tok, "-d", tmp_path / "short.txt", "-n", 8, "-L", 128)
    assert "fewer than the 8 samples" in err and "lower --samples" in err
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x " * 500}) + "\n")
    err = _bad(cli, tmp_path, tiny_tok, "-d", tmp_path / "rows.jsonl", "--text-field", "text")
    assert "no text field 'text'" in err and "body" in err
    err = _bad(cli, tmp_path, tiny_tok, "-d", "canterbury", "-L", 4096)
    assert "beyond the model's context of 2048" in err
    # tiny_llama has a 1024-token vocabulary and no tokenizer
    assert "--tokenizer" in _bad(cli, tmp_path, tiny_llama, "-d", "canterbury")
    err = _bad(cli, tmp_path, tiny_llama, "-d", "canterbury", "--tokenizer", tiny_tok)
    assert "beyond the model's vocabulary of 1024" in err


def test_unreachable_hub_dataset(
    cli, tiny_tok: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = _bad(cli, tmp_path, tiny_tok, "-d", "qtool-tests/not-a-dataset:train")
    assert "unreachable" in err and "--dataset canterbury" in err


def test_gguf_source_is_refused(cli, assets, tmp_path: Path) -> None:
    err = _bad(cli, tmp_path, assets.smollm2_gguf, "-d", "canterbury")
    assert "safetensors" in err and "llama-imatrix" in err
