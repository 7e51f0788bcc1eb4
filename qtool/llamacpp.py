"""Opening GGUF files with llama-cpp-python, safely on every x86 machine.

llama.cpp's CPU backend moves quantized weights into "extra buffer types" (AMX tiles, repacked
layouts) when the CPU advertises them. On machines that report AMX but whose kernel does not
grant it to the process (seen on this project's VMs), ``ggml_backend_amx_mul_mat`` crashes with
SIGSEGV on the first matrix product of any quantized model. ``open_llama`` turns the extra
buffer types off there; results are the same, the plain CPU kernels compute them.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "amx" in line for line in f)
    except OSError:
        return False


@contextmanager
def _model_params(extra_bufts: bool) -> Iterator[None]:
    import llama_cpp
    import llama_cpp.llama as llama_mod

    original = llama_cpp.llama_model_default_params

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = extra_bufts
        return params

    llama_mod.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        llama_mod.llama_cpp.llama_model_default_params = original


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp prints load messages from C on fd 2 even with verbose=False: hide them."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        # llama-cpp-python's log callback prints through sys.stderr, which need not be fd 2
        with open(os.devnull, "wb") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def open_llama(path: Path | str, *, extra_bufts: bool | None = None, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, **kwargs)`` with the AMX crash avoided and
    llama.cpp's C-level load messages kept off stderr.

    ``extra_bufts`` None means: on unless the CPU reports AMX."""
    from llama_cpp import Llama

    use = (not cpu_has_amx()) if extra_bufts is None else extra_bufts
    kwargs.setdefault("verbose", False)
    with _model_params(use), quiet_stderr():
        return Llama(model_path=str(path), **kwargs)
