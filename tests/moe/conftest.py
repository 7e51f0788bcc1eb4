from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.llamacpp_convert import llama_cpp_source


@pytest.fixture(scope="session")
def llama_src() -> Path:
    """llama.cpp's sources from the llama-cpp-python 0.3.36 sdist (fetched once into
    ~/.cache/qtool/llama-src). A failure, never a skip, when they cannot be had."""
    try:
        return llama_cpp_source()
    except RuntimeError as e:
        pytest.fail(f"llama.cpp's sources are needed as the reference: {e}")
