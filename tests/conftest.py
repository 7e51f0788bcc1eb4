"""Shared fixtures: the offline real assets, a tiny random Llama, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Test workers (pytest-xdist: `make test` runs one per core): each worker, and every qtool
# process its tests start, gets its share of the cores' threads instead of all of them, so
# the workers do not fight over the cores (OpenMP threads spin while they wait). A test that
# needs a thread count sets OMP_NUM_THREADS itself. (No plugin imports torch before this file:
# torch reads the variable when it is first imported.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))


@dataclass(frozen=True)
class Assets:
    root: Path
    canterbury: Path
    smollm2_gguf: Path
    smollm2_hf: Path
    gemma3_gguf: Path | None
    gemma3_hf: Path | None


@pytest.fixture(scope="session")
def assets() -> Assets:
    """The offline assets of ``make assets`` (prepared on first use). Gemma 3 is included when
    already prepared (``make assets-gemma``) or when QTOOL_TEST_GEMMA=1."""
    cmd = [sys.executable, str(REPO / "scripts" / "assets.py")]
    root = Path(os.environ.get("QTOOL_ASSETS", Path.home() / ".cache" / "qtool" / "assets"))
    if (
        os.environ.get("QTOOL_TEST_GEMMA") == "1"
        or (root / "gemma3-270m-hf" / "config.json").exists()
    ):
        cmd.append("--gemma")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"scripts/assets.py failed:\n{proc.stderr[-3000:]}")
    p = json.loads(proc.stdout)
    opt = lambda k: Path(p[k]) if p.get(k) else None  # noqa: E731
    return Assets(
        Path(p["root"]),
        Path(p["canterbury"]),
        Path(p["smollm2_gguf"]),
        Path(p["smollm2_hf"]),
        opt("gemma3_gguf"),
        opt("gemma3_hf"),
    )


TINY_LLAMA = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def make_tiny_llama(path: Path, dtype: str = "bfloat16", **overrides: object) -> Path:
    """A random Llama with 256-multiple dims, saved as an HF safetensors checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def with_tokenizer(folder: Path, assets: Assets) -> Path:
    """``folder`` (a checkpoint with SmolLM2's vocabulary size) given SmolLM2's tokenizer: what
    calibration and ``qtool eval`` need of a tiny random model."""
    for name in TOKENIZER_FILES:
        shutil.copy(assets.smollm2_hf / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory, assets: Assets) -> Path:
    """A random 2-layer Llama (256/512 dims) with SmolLM2's vocabulary size and tokenizer."""
    path = make_tiny_llama(tmp_path_factory.mktemp("tinytok") / "tiny-tok", vocab_size=49152)
    return with_tokenizer(path, assets)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``qtool ARGS`` in-process through the real entry point (error mapping included)."""
    from qtool.cli.app import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main(list(map(str, args)))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


# A qtool process that SIGKILLs itself right after its resume folder recorded the N-th layer
# (``WorkFolder.save``, GPTQ's and calibration's): a kill at an exact, machine-independent point.
_KILLED_AFTER_LAYERS = """
import os, signal, sys
from qtool.runner.workdir import WorkFolder
real, seen = WorkFolder.save, [0]
def save(self, *a, **k):
    real(self, *a, **k)
    seen[0] += 1
    if seen[0] == int(os.environ["QTOOL_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
WorkFolder.save = save
from qtool.cli import main
main(sys.argv[1:])
"""


def run_killed_after_layers(qtool_args: list[str], layers: int, env: dict[str, str]) -> None:
    """Run ``qtool *qtool_args`` and kill it once ``layers`` layers are in its resume folder."""
    root = str(Path(__file__).resolve().parents[1])  # this checkout's qtool
    env = {**env, "QTOOL_TEST_KILL_AFTER": str(layers)}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _KILLED_AFTER_LAYERS, *qtool_args], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, f"not killed after layer {layers}: {proc.stderr[-2000:]}"
