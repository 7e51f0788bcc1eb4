"""Fixtures for the codec tests: llama.cpp's libggml (the reference) and real weight rows."""

from __future__ import annotations

import numpy as np
import pytest
from qtool.kernels.types import QK_K


@pytest.fixture(scope="session")
def ggml():
    """libggml-base from the installed llama-cpp-python, through ctypes.

    Fails (never skips): llama-cpp-python is a dev dependency that ``make test`` installs, and
    without it nothing here proves the codecs right.
    """
    from qtool.kernels import _ggml

    try:
        return _ggml.load()
    except (OSError, FileNotFoundError) as e:
        pytest.fail(
            f"cannot load libggml from llama-cpp-python ({e}); install the dev dependencies "
            "(pip install -e '.[dev]')"
        )


def _gguf_rows(path, names: list[str], max_rows: int) -> dict[str, np.ndarray]:
    """A few rows of each named tensor, dequantized to float32 with gguf-py."""
    import gguf

    reader = gguf.GGUFReader(path)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in names:
            data = np.asarray(t.data)[:max_rows]
            rows = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)
            out[t.name] = rows.reshape(rows.shape[0], -1)
    missing = set(names) - set(out)
    assert not missing, f"{path.name} lacks tensors {sorted(missing)}"
    return out


@pytest.fixture(scope="session")
def real_rows(assets) -> dict[str, np.ndarray]:
    """Real weight rows from SmolLM2-135M and (when prepared) Gemma 3 270M, 256-multiple long.

    SmolLM2's 576-wide rows and Gemma's 640-wide ones are cut to their first 512 values so the
    k-quants (256 per block) can take them; the 1536/1024/2048-wide rows are used whole.
    """
    rows: dict[str, np.ndarray] = {}
    smol = _gguf_rows(
        assets.smollm2_gguf,
        ["token_embd.weight", "blk.0.ffn_down.weight", "blk.3.attn_q.weight"],
        24,
    )
    rows["smollm2.token_embd[:, :512]"] = smol["token_embd.weight"][:, :512]
    rows["smollm2.blk.0.ffn_down"] = smol["blk.0.ffn_down.weight"]
    rows["smollm2.blk.3.attn_q[:, :512]"] = smol["blk.3.attn_q.weight"][:, :512]
    if assets.gemma3_gguf is not None:
        gem = _gguf_rows(
            assets.gemma3_gguf,
            ["blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight"],
            16,
        )
        rows["gemma3.blk.0.attn_output"] = gem["blk.0.attn_output.weight"]
        rows["gemma3.blk.0.ffn_down"] = gem["blk.0.ffn_down.weight"]
        rows["gemma3.blk.1.attn_q[:, :512]"] = gem["blk.1.attn_q.weight"][:, :512]
    for name, r in rows.items():
        assert r.shape[1] % QK_K == 0, (name, r.shape)
        rows[name] = np.ascontiguousarray(r, dtype=np.float32)
    return rows
