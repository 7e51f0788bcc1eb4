"""Calibration samples: deterministic, seed-dependent, the same from every kind of source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qtool.calibrate.datasets import (
    HubDatasetUnreachableError,
    calibration_sets_dir,
    load_documents,
    make_samples,
    resolve_dataset,
    window_rank,
)
from qtool.errors import BadInputError

CANTERBURY_SET = ("alice29.txt", "asyoulik.txt", "lcet10.txt")
# SHA-256 of the int32 token ids of `canterbury`, SmolLM2's tokenizer, 4 x 256, seed 0. A
# constant: the same on every machine (hash-ranked windows, no RNG library involved).
CANTERBURY_4x256_SEED0 = "2a6959d271710cd740df163784164b05e2a1ebade742ef02291b416c5781d16a"


def samples_of(spec: str, tok, n: int = 4, seq_len: int = 256, seed: int = 0, **kw):
    docs = load_documents(resolve_dataset(spec, **kw))
    return make_samples(docs, tok, samples=n, seq_len=seq_len, seed=seed)


def test_named_set_is_deterministic_and_pinned(smol_tokenizer) -> None:
    a = samples_of("canterbury", smol_tokenizer)
    b = samples_of("canterbury", smol_tokenizer)
    assert a.ids.tolist() == b.ids.tolist()
    assert a.tokens_sha256 == b.tokens_sha256 == CANTERBURY_4x256_SEED0
    assert a.ids.shape == (4, 256) and a.documents == 3


def test_seeds_differ(smol_tokenizer) -> None:
    a = samples_of("canterbury", smol_tokenizer, seed=0)
    b = samples_of("canterbury", smol_tokenizer, seed=1)
    assert a.windows != b.windows and a.tokens_sha256 != b.tokens_sha256


def test_window_rank_is_a_fixed_hash() -> None:
    # sha256("qtool-calibration:0:0"): the ranking cannot drift with library versions.
    assert (
        window_rank(0, 0).hex()[:16]
        == __import__("hashlib").sha256(b"qtool-calibration:0:0").hexdigest()[:16]
    )


def test_local_files_and_datasets_formats_agree(assets, smol_tokenizer, tmp_path: Path) -> None:
    """The named set, the same files as a folder, and the same texts as jsonl/parquet/csv rows
    (all read through `datasets`) give the same token ids."""
    import pandas as pd

    texts = [(assets.canterbury / n).read_text() for n in CANTERBURY_SET]
    folder = tmp_path / "txt"
    folder.mkdir()
    for n in CANTERBURY_SET:
        (folder / n).write_text((assets.canterbury / n).read_text())
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pd.DataFrame({"id": [1, 2, 3], "text": texts}).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "c.csv", index=False)
    ref = samples_of("canterbury", smol_tokenizer)
    for spec in (folder, tmp_path / "c.jsonl", tmp_path / "c.parquet", tmp_path / "c.csv"):
        got = samples_of(str(spec), smol_tokenizer)
        assert got.tokens_sha256 == ref.tokens_sha256, spec
        assert got.text_sha256 == ref.text_sha256, spec


def test_hub_spec_parsing() -> None:
    s = resolve_dataset("org/name:train")
    assert (s.kind, s.path, s.config, s.split, s.text_field) == (
        "hub",
        "org/name",
        None,
        "train",
        None,
    )
    s = resolve_dataset("org/name:cfg:validation")
    assert (s.config, s.split, s.text_field) == ("cfg", "validation", None)
    s = resolve_dataset("org/name:train:content")
    assert (s.config, s.split, s.text_field) == (None, "train", "content")
    s = resolve_dataset("org/name:cfg:train_sft:messages")
    assert (s.config, s.split, s.text_field) == ("cfg", "train_sft", "messages")
    s = resolve_dataset("wikitext2")
    assert s.kind == "hub" and s.revision and len(s.revision) == 40 and s.text_field == "text"
    with pytest.raises(BadInputError, match="needs a split"):
        resolve_dataset("org/name")
    with pytest.raises(BadInputError, match="which part is the split"):
        resolve_dataset("org/name:foo:bar")
    with pytest.raises(BadInputError, match="no such file"):
        resolve_dataset("./missing.jsonl")
    with pytest.raises(BadInputError, match="not a named set"):
        resolve_dataset("nonsense")


def test_empty_and_short_datasets(smol_tokenizer, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(BadInputError, match="no text"):
        samples_of(str(tmp_path / "empty.txt"), smol_tokenizer)
    (tmp_path / "short.txt").write_text("A short text. " * 40)
    with pytest.raises(BadInputError, match=r"windows of 256, fewer than the 4 samples"):
        samples_of(str(tmp_path / "short.txt"), smol_tokenizer)


def test_missing_text_field(smol_tokenizer, tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"content": "x " * 300, "n": i}) + "\n" for i in range(3)))
    with pytest.raises(BadInputError, match=r"no text field 'body' \(columns: content, n\)"):
        samples_of(str(p), smol_tokenizer, text_field="body")
    q = tmp_path / "e.jsonl"
    q.write_text("".join(json.dumps({"a": "x " * 300, "b": "y"}) + "\n" for _ in range(3)))
    with pytest.raises(BadInputError, match="--text-field"):
        samples_of(str(q), smol_tokenizer)
    # a single string column is used without asking
    assert samples_of(str(p), smol_tokenizer, n=1, seq_len=64).ids.shape == (1, 64)


def test_unreachable_hub_dataset_names_the_offline_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "remote.yaml").write_text(
        "hub: {path: qtool-tests/not-a-dataset, revision: main, split: train, field: text}\n"
    )
    shutil.copy(calibration_sets_dir() / "canterbury.yaml", tmp_path)  # an offline set
    monkeypatch.setenv("QTOOL_CALIBRATION_SETS", str(tmp_path))
    for spec in ("remote", "qtool-tests/not-a-dataset:train"):
        with pytest.raises(HubDatasetUnreachableError) as e:
            load_documents(resolve_dataset(spec))
        assert "unreachable" in str(e.value) and "--dataset canterbury" in str(e.value)
        assert e.value.exit_code == 2


def test_long_document_is_tokenized_in_pieces_with_the_whole_texts_tokens(
    assets, smol_tokenizer, tmp_path: Path
) -> None:
    """A text file longer than PIECE_CHARS is tokenized in pieces (bounded memory) cut where
    the byte-level BPE pre-tokenizer splits anyway: the stream equals the tokenizer's own
    tokens of the whole text, and the pieces join back into it."""
    from qtool.calibrate import datasets as ds

    text = "\n\n".join(
        (assets.canterbury / f).read_text(encoding="utf-8") for f in ("lcet10.txt", "alice29.txt")
    )
    assert len(text) > 2 * ds.PIECE_CHARS
    pieces = ds._pieces(text)
    assert len(pieces) >= 3 and "".join(pieces) == text
    assert all(len(p) <= ds.PIECE_CHARS for p in pieces)
    whole = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    n = len(whole) // 128
    s = samples_of(str(tmp_path / "long.txt"), smol_tokenizer, n=n, seq_len=128)
    assert s.stream_tokens == len(whole) and s.documents == 1
    for row, i in zip(s.ids.tolist(), s.windows, strict=True):
        assert row == whole[i * 128 : (i + 1) * 128]
