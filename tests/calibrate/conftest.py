"""Fixtures for the calibration tests: a tiny Llama that SmolLM2's tokenizer can drive."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory, assets) -> Path:
    """A random 2-layer Llama (256/512 dims) with SmolLM2's vocabulary size and tokenizer."""
    path = make_tiny_llama(tmp_path_factory.mktemp("tinytok") / "tiny-tok", vocab_size=49152)
    for name in TOKENIZER_FILES:
        shutil.copy(assets.smollm2_hf / name, path / name)
    return path


@pytest.fixture(scope="session")
def smol_tokenizer(assets):
    """SmolLM2's tokenizer (offline assets)."""
    from qtool.calibrate.datasets import load_tokenizer

    return load_tokenizer(assets.smollm2_hf)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread in these tests: on the shared 2-core CI machine, two threads per op
    wait on each other's time slices and small ops take 10x longer (measured: a SmolLM2
    calibration of 4 x 256 tokens ran 122 s with 2 threads under load, 18 s with 1)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
