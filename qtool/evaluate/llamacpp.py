"""Opening a GGUF with llama-cpp-python for evaluation: every position's logits kept.

The AMX crash workaround (llama.cpp's extra buffer types off on CPUs that report AMX) lives in
``qtool.llamacpp``; see there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtool.llamacpp import open_llama as _open


def open_llama(path: Path | str, n_ctx: int, threads: int | None = None, **kwargs: Any) -> Any:
    """``llama_cpp.Llama`` for ``path`` with every position's logits kept (``logits_all``),
    ``threads`` for both prompt and generation (default: all cores)."""
    n = threads or os.cpu_count() or 1
    params: dict[str, Any] = dict(
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        logits_all=True,
        n_threads=n,
        n_threads_batch=n,
    )
    params.update(kwargs)
    return _open(path, **params)
