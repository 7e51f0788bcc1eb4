"""Fixtures for the calibration tests: a tiny Llama that SmolLM2's tokenizer can drive."""

from __future__ import annotations

import pytest


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
