"""Global CLI conventions: stdout/stderr split, --json, -q, exit codes, missing sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_help_lists_the_five_commands(cli) -> None:
    r = cli("--help")
    assert r.exit_code == 0
    for cmd in ("inspect", "calibrate", "quantize", "eval", "export"):
        assert cmd in r.stdout


def test_version(cli) -> None:
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("qtool ")


def test_json_goes_to_stdout_alone(cli, tiny_llama: Path) -> None:
    r = cli("inspect", tiny_llama, "--json")
    assert r.exit_code == 0
    json.loads(r.stdout)  # the whole of stdout is one JSON document


def test_human_report_on_stdout(cli, tiny_llama: Path) -> None:
    r = cli("inspect", tiny_llama)
    assert r.exit_code == 0
    assert "Memory footprint" in r.stdout and "Q4_K_M" in r.stdout and "GPTQ 4-bit g128" in r.stdout


def test_quiet_suppresses_warnings(cli, tiny_llama: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(tiny_llama / "model.safetensors", tmp_path / "model.safetensors")
    assert "warning" in cli("inspect", tmp_path).stderr
    assert cli("-q", "inspect", tmp_path).stderr == ""


@pytest.mark.parametrize("method", ["rtn", "gptq", "bitnet"])
def test_quantize_methods_name_a_missing_source(cli, method: str, tmp_path: Path) -> None:
    """Every method resolves the source first-class: a missing repo is one line, no output."""
    r = cli("quantize", tmp_path / "no-such-model", "--method", method, "--bits", "4" if
            method != "bitnet" else "2", "-d", "canterbury", "-o", tmp_path / "out")  # fmt: skip
    assert r.exit_code == 2, r.stderr
    assert "no-such-model" in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "QTOOL_DEBUG": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "qtool", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "qtool", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "qtool"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "inspect" in r.stdout
