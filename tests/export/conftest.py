"""Fixtures of the export tests: llama.cpp's converter sources, a SentencePiece tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama_src() -> Path:
    """llama.cpp's sources with ``convert_hf_to_gguf.py`` (fetched once into a cache outside
    git). A reference that cannot be fetched fails the tests that need it; it never skips."""
    from tests.export.llamacpp_convert import llama_cpp_source

    try:
        return llama_cpp_source()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def spm_dir(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024-piece SentencePiece ``tokenizer.model`` trained on a Canterbury text (for the
    families whose llama.cpp converter reads ``tokenizer.model``: Gemma 2)."""
    from tests.export.helpers import spm_tokenizer

    return spm_tokenizer(tmp_path_factory.mktemp("spm"), assets.canterbury / "alice29.txt")
