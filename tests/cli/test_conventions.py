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


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "rtn", "--bits", "4"],
        ["--method", "gptq", "--bits", "4", "-d", "canterbury"],
        ["--method", "gptq", "--type", "Q4_K_M", "-d", "canterbury"],
        ["--method", "bitnet"],
        ["--type", "Q4_K_M"],
    ],
)
def test_quantize_methods_name_a_missing_source(cli, args: list[str], tmp_path: Path) -> None:
    """Every method resolves the source first-class: a missing repo is one line, no output."""
    r = cli("quantize", tmp_path / "no-such-model", *args, "-o", tmp_path / "out")
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


@pytest.mark.parametrize("flag", ["-q", "-v", "--json", "--quiet"])
def test_global_flags_after_the_command(cli, tiny_llama: Path, flag: str) -> None:
    before = cli(flag, "inspect", tiny_llama)
    after = cli("inspect", tiny_llama, flag)
    assert before.exit_code == after.exit_code == 0
    assert before.stdout == after.stdout
    if flag == "--json":
        json.loads(after.stdout)


def _imports_after(args: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from qtool.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'numba', 'datasets') "
        "if m in sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return set(r.stderr.strip().splitlines()[-1].split()) if r.stderr.strip() else set()


def test_quick_start_imports_neither_torch_nor_transformers(tiny_llama: Path) -> None:
    """qtool --help, --version and a header-only inspect: shell pipelines call them often."""
    for args in (["--help"], ["--version"], ["inspect", str(tiny_llama), "-q"]):
        assert not _imports_after(args) & {"torch", "transformers"}, args


@pytest.mark.parametrize("delay", [0.5, 2.0, 3.5])
def test_ctrl_c_at_any_moment_is_one_line_and_130(assets, tmp_path: Path, delay: float) -> None:
    """SIGINT during start-up (the interpreter, the imports), while loading, or in the middle
    of writing a GGUF: exit 130, one line, no traceback, nothing half-written."""
    import signal
    import time

    out = tmp_path / "out.gguf"
    p = subprocess.Popen(
        [sys.executable, "-m", "qtool", "quantize", str(assets.smollm2_hf), "--type", "Q4_K_M",
         "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job starts with SIGINT ignored, which Python keeps: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_same_command_twice_replaces_the_output(cli, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    for _ in range(2):
        r = cli("quantize", tiny_llama, "--bits", "4", "-g", "64", "-o", out)
        assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4"]  # no temp or old folder left
