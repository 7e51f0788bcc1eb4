"""Evaluation text: resolve ``--dataset``, tokenize with the base tokenizer, cut into windows.

Windows follow llama.cpp's ``llama-perplexity`` (tools/perplexity/perplexity.cpp,
``perplexity()``): the whole text is tokenized once (with BOS when the tokenizer adds one), cut
into consecutive non-overlapping windows of ``ctx`` tokens, and the first token of every window
is replaced by BOS when the tokenizer adds BOS. The same windows serve both scorings; only the
positions scored differ (see :func:`scored_positions`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import BadInputError

CANTERBURY_PREFIX = "canterbury"


def assets_root() -> Path:
    """Where ``make assets`` puts the offline assets (``$QTOOL_ASSETS`` overrides)."""
    return Path(os.environ.get("QTOOL_ASSETS", Path.home() / ".cache" / "qtool" / "assets"))


@dataclass(frozen=True)
class Dataset:
    label: str  # what to print: the spec as given
    files: tuple[Path, ...]
    text: str


def resolve_dataset(spec: str) -> Dataset:
    """Turn ``--dataset`` into text: a text file, a folder of ``*.txt`` files (sorted, joined by
    a blank line), ``canterbury:FILE`` or ``canterbury`` (the offline Canterbury corpus).

    Kept as one function so the calibration-set resolver can replace it later.
    """
    if spec == CANTERBURY_PREFIX or spec.startswith(CANTERBURY_PREFIX + ":"):
        folder = assets_root() / "canterbury"
        name = spec.partition(":")[2]
        path = folder / name if name else folder
        if not path.exists():
            known = ", ".join(sorted(p.name for p in folder.glob("*.txt"))) or "none"
            raise BadInputError(
                f"--dataset {spec}: {path} not found (Canterbury files here: {known})",
                hint="run `make assets` to prepare the corpus, or pass a local .txt file",
            )
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise BadInputError(
                f"--dataset {spec}: no such file or folder",
                hint="pass a text file, a folder of .txt files, or canterbury:FILE "
                "(e.g. canterbury:plrabn12.txt)",
            )
    files = tuple(sorted(path.glob("*.txt"))) if path.is_dir() else (path,)
    if not files:
        raise BadInputError(f"--dataset {spec}: the folder {path} holds no .txt files")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise BadInputError(
                f"--dataset {spec}: {f} is not UTF-8 text (byte {e.start})",
                hint="convert it to UTF-8 first",
            ) from e
    text = "\n\n".join(parts)
    if not text.strip():
        raise BadInputError(f"--dataset {spec}: the text is empty")
    return Dataset(spec, files, text)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text (llama.cpp: ``add_bos_token``)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of the whole text (int64), special tokens as the tokenizer adds them."""
    # The text is one long sequence on purpose; silence the "longer than model_max_length" note.
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def make_windows(
    tokens: np.ndarray, ctx: int, chunks: int | None, bos_id: int | None
) -> tuple[np.ndarray, int]:
    """Cut ``tokens`` into windows of ``ctx`` tokens, shape (n, ctx); returns (windows, the
    number that would fit). BOS replaces each window's first token when ``bos_id`` is given,
    as perplexity.cpp does."""
    available = len(tokens) // ctx
    if available == 0:
        raise BadInputError(
            f"the dataset has {len(tokens)} tokens, fewer than one window of --ctx {ctx}",
            hint=f"use --ctx {max(2, len(tokens) // 2)} or less, or a longer text",
        )
    n = available if chunks is None else min(chunks, available)
    windows = tokens[: n * ctx].reshape(n, ctx).copy()
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows, available


def scored_positions(ctx: int, scoring: str) -> tuple[int, int]:
    """[first, last) logit positions scored in a window: position t predicts token t + 1.

    ``full``: every position but the last (ctx - 1 predictions, what transformers' loss
    averages). ``second-half``: perplexity.cpp's ``first = n_ctx/2`` to ``n_ctx - 2``, so every
    scored token has at least ctx/2 tokens of context.
    """
    first = 0 if scoring == "full" else ctx // 2
    return first, ctx - 1
