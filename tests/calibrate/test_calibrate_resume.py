"""A killed ``qtool calibrate`` resumes from its work folder to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtool.runner.workdir import STATE
from tests.conftest import make_tiny_llama, run_killed_after_layers, with_tokenizer


@pytest.fixture(scope="module")
def deep8(tmp_path_factory: pytest.TempPathFactory, assets) -> Path:
    """8 layers, SmolLM2's tokenizer."""
    path = make_tiny_llama(
        tmp_path_factory.mktemp("deep8") / "m", num_hidden_layers=8, vocab_size=49152
    )
    return with_tokenizer(path, assets)


def _cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "qtool", "calibrate", str(src), "-d", "canterbury", "-n", "12",
        "-L", "128", "--compute-dtype", "float32", "-o", str(out),
        "--imatrix", str(out.with_suffix(".imatrix.gguf")), *extra,
    ]  # fmt: skip


def test_killed_calibration_resumes_to_the_same_bytes(deep8: Path, tmp_path: Path) -> None:
    """Killed right after layer 4 was recorded (hidden states checkpointed every 3), resumed
    from the checkpoint at layer 3: the stats file and the imatrix equal an uninterrupted
    run's, byte for byte."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QTOOL_CHECKPOINT_EVERY": "3"}
    env.pop("SOURCE_DATE_EPOCH", None)
    full = tmp_path / "full.safetensors"
    subprocess.run(_cmd(deep8, full), check=True, env=env, capture_output=True)

    out = tmp_path / "resumed.safetensors"
    work = tmp_path / "resumed.safetensors.qtool-calibrate"
    run_killed_after_layers(_cmd(deep8, out)[3:], 4, env)
    assert not out.exists()
    state = json.loads((work / STATE).read_text())
    assert state["layers_done"] == 4 and state["hidden_at"] == 3

    again = subprocess.run(_cmd(deep8, out), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently restarted

    r = subprocess.run(_cmd(deep8, out, "--resume", str(work)), env=env, capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "resuming at layer 3 of 8" in r.stderr
    assert out.read_bytes() == full.read_bytes()
    imx = ".imatrix.gguf"
    assert out.with_suffix(imx).read_bytes() == full.with_suffix(imx).read_bytes()
    assert not work.exists()  # removed once the outputs are complete


def test_resume_folder_of_another_run_refused(cli, deep8: Path, tmp_path: Path) -> None:
    from qtool.runner.layers import CalibrationWork

    work = tmp_path / "w"
    CalibrationWork.open(work, {"model": {"other": 1}}, resume=False).save(0, {}, [], None)
    r = cli(*_cmd(deep8, tmp_path / "s.safetensors", "--resume", str(work))[3:])
    assert r.exit_code == 2 and "another run" in r.stderr, r.stderr
    assert not (tmp_path / "s.safetensors").exists()
