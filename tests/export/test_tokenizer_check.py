"""Every GGUF export tokenizes a fixed set of strings with llama.cpp's tokenizer (from the
written file) and with the source's Hugging Face tokenizer; differences are reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qtool.formats.tokcheck import probe_strings
from tests.conftest import make_tiny_llama, with_tokenizer


@pytest.fixture(scope="module")
def smol_vocab(tmp_path_factory: pytest.TempPathFactory, assets) -> Path:
    path = with_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("tok") / "m", vocab_size=49152),
                          assets)  # fmt: skip
    shutil.copy(assets.smollm2_hf / "chat_template.jinja", path)
    return path


def test_probes_cover_scripts_specials_and_the_chat_template(smol_vocab: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_vocab))
    probes = probe_strings(tok)
    text = "\n".join(probes)
    for sample in ("Съешь", "我能", "나는", "أنا", "\tre", "12345", "<|im_start|>"):
        assert sample in text, sample
    assert any(p.startswith("<|im_start|>system") for p in probes)  # the rendered template


def test_exported_gguf_agrees_with_transformers(cli, smol_vocab: Path, tmp_path: Path) -> None:
    r = cli("export", smol_vocab, "--type", "Q8_0", "-o", tmp_path / "m.gguf", "--json")
    assert r.exit_code == 0, r.stderr
    check = r.json()["outputs"][0]["tokenizer_check"]
    assert check["ran"] and check["differ"] == 0 and check["strings"] >= 30, check


def test_a_wrong_pre_tokenizer_is_reported(cli, smol_vocab: Path, tmp_path: Path) -> None:
    """deepseek-coder's pre-tokenizer splits Hangul and letters otherwise than SmolLM2's:
    llama.cpp then tokenizes some probes differently, a warning; with --strict an error."""
    out = tmp_path / "m.gguf"
    args = ("export", smol_vocab, "--type", "Q8_0", "--tokenizer-pre", "deepseek-coder")
    r = cli(*args, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    check = r.json()["outputs"][0]["tokenizer_check"]
    assert check["differ"] > 0, check
    assert "tokenizes" in r.stderr and "--tokenizer-pre" in r.stderr

    strict = tmp_path / "s.gguf"
    r = cli(*args, "--strict", "-o", strict)
    assert r.exit_code == 2, r.stderr
    assert (
        "differently" in r.stderr and "nothing written" in r.stderr and "Traceback" not in r.stderr
    )
    assert not strict.exists() and not list(tmp_path.glob("*s.gguf*"))
