"""Source resolution: local folders, GGUF files, the Hub cache (offline), and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def qtool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console entry point in a subprocess (fresh env, real exit code)."""
    return subprocess.run(
        [sys.executable, "-m", "qtool", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == ""


def test_hub_id_resolves_offline_from_cache(tiny_llama: Path, tmp_path: Path) -> None:
    """A real huggingface_hub cache layout (blobs, refs, snapshots) in a temporary HF_HOME."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_llama.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = qtool("inspect", "acme/tiny-llama", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["model"]["layers"] == 2 and rep["params"]["total"] > 0
    assert rep["model"]["bytes_on_disk"] == (tiny_llama / "model.safetensors").stat().st_size
    # A repo absent from the cache: one line, exit 2, the way out named.
    r = qtool("inspect", "acme/absent", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not in the local Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_gguf_source(cli, assets) -> None:
    r = cli("inspect", assets.smollm2_gguf, "--json")
    assert r.exit_code == 0, r.stderr
    rep = r.json()
    assert rep["model"]["format"] == "gguf" and rep["model"]["layers"] == 30
    assert rep["params"]["by_dtype"] == {"Q8_0": 28311552, "F32": 35136, "Q4_1": 106168320}
    # Same parameter count as the HF conversion of the same file.
    assert (
        rep["params"]["total"]
        == cli("inspect", assets.smollm2_hf, "--json").json()["params"]["total"]
    )


def test_missing_path(cli) -> None:
    one_line_error(cli("inspect", "./no/such/folder"), 2, "no such file or folder")


def test_folder_without_config(cli, tmp_path: Path) -> None:
    one_line_error(cli("inspect", tmp_path), 2, "no config.json")


def test_folder_without_weights(cli, tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path)
    one_line_error(cli("inspect", tmp_path), 2, "no weights found")


def test_truncated_safetensors(cli, tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path)
    data = (tiny_llama / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(cli("inspect", tmp_path), 2, "truncated safetensors file", "re-download")
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    one_line_error(cli("inspect", tmp_path), 2, "truncated")


def test_index_naming_missing_shard(cli, tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path)
    shutil.copy(tiny_llama / "model.safetensors", tmp_path / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00001-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(cli("inspect", tmp_path), 2, "model-00002-of-00002.safetensors", "missing")


def test_pickle_only_checkpoint_refused(cli, tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    one_line_error(cli("inspect", tmp_path), 2, "pickle", "--allow-pickle")


def test_corrupt_gguf(cli, assets, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    with open(assets.smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    one_line_error(cli("inspect", bad), 2, "truncated GGUF")
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    one_line_error(cli("inspect", bad), 2, "not a GGUF file")


def test_unknown_architecture_is_inspected_with_a_warning(
    cli, tiny_llama: Path, tmp_path: Path
) -> None:
    shutil.copy(tiny_llama / "model.safetensors", tmp_path)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "frobnicator", ["FrobForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = cli("inspect", tmp_path, "--json")
    assert r.exit_code == 0
    assert r.json()["model"]["gguf_export_supported"] is False
    assert "frobnicator" in r.stderr and "not supported" in r.stderr


def test_config_without_shape_is_a_clear_error(cli, tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    one_line_error(cli("inspect", tmp_path), 2, "cannot read the model's shape")


def test_unwritable_output(cli, tiny_llama: Path, tmp_path: Path) -> None:
    one_line_error(
        cli("inspect", tiny_llama, "-o", tmp_path / "nope" / "r.json"), 2, "does not exist"
    )


def test_readonly_output_folder(cli, tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    """A folder the user may not write to (simulated: the suite may run as root, which
    ignores permission bits): one line, exit 2, nothing written."""
    import qtool.io

    real_access = os.access
    monkeypatch.setattr(
        qtool.io.os, "access", lambda p, m: False if m == os.W_OK else real_access(p, m)
    )
    one_line_error(cli("inspect", tiny_llama, "-o", tmp_path / "r.json"), 2, "not writable")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_as_root_via_readonly_file(cli, tiny_llama: Path, tmp_path: Path) -> None:
    """Root ignores directory permissions; a path under a regular file fails for everyone."""
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(cli("inspect", tiny_llama, "-o", f / "r.json"), 2, "does not exist")
    assert f.read_text() == "x"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--batch", "0"], "--batch"),
        (["--context", "-5"], "--context"),
        (["--cache-dtype", "int3"], "unknown cache dtype"),
        (["--gpu-mem", "0.5"], "--gpu-mem"),
        (["--bogus"], "No such option"),
    ],
)
def test_nonsense_options(cli, tiny_llama: Path, args: list[str], needle: str) -> None:
    r = cli("inspect", tiny_llama, *args)
    assert r.exit_code == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cache_folder_made_twice_at_once_keeps_the_first(tmp_path: Path) -> None:
    """Two processes filling the same cache entry (the GGUF -> HF view, test workers sharing an
    asset): the one finishing second drops its copy; a reader of the first never sees it go."""
    from qtool.io import atomic_dir

    out = tmp_path / "entry"
    with atomic_dir(out, first_wins=True) as second:
        (second / "config.json").write_text("second")
        with atomic_dir(out, first_wins=True) as first:  # starts later, finishes first
            (first / "config.json").write_text("first")
        held = (out / "config.json").open()  # a reader of the first entry
    assert held.read() == "first" and (out / "config.json").read_text() == "first"
    held.close()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary left
    with atomic_dir(out) as again:  # the default still replaces
        (again / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"
