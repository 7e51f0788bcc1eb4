"""``qtool calibrate --imatrix`` against llama.cpp's own ``llama-imatrix`` (default suite).

llama-imatrix is built once by scripts/build_llama_tools.sh into ~/.cache/qtool/llama-build
(QTOOL_LLAMA_BUILD) and reused: llama-common and the tool compiled from the llama-cpp-python
sdist (fetched from PyPI when missing), linked against the installed llama_cpp package's
libllama/libggml, so ggml and llama are not compiled again (4 to 7 min on 2 busy cores, about
250 s of CPU, the first time; a no-op after). The test FAILS, never skips, when the tool cannot
be built.

Both tools see the same token chunks, as scripts/check_imatrix.py arranges them (that script
runs larger comparisons): an F32 GGUF of SmolLM2 by llama.cpp's convert_hf_to_gguf.py; a
Canterbury text cut so that it holds CHUNKS x CTX tokens plus less than one more window, so
qtool's windows are exactly llama-imatrix's first CHUNKS chunks (in another order; the token ids
are checked by their SHA-256); llama-imatrix with -fa off and an F32 KV cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.calibrate.datasets import load_tokenizer, tokens_sha256
from qtool.calibrate.imatrix import load_imatrix

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from llama_tools import (  # noqa: E402
    LlamaBuildError,
    f32_gguf,
    llama_bin,
    llama_tokens,
)

CHUNKS, CTX = 4, 256
N_TENSORS = 30 * 7  # SmolLM2: 30 layers x q, k, v, o, gate, up, down


def _cut_text(text: str, tokenizer) -> str:
    """The start of ``text`` holding CHUNKS x CTX tokens and half a window more."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text[: enc["offset_mapping"][CHUNKS * CTX + CTX // 2][1]]


def test_imatrix_matches_llama_imatrix(cli, assets, tmp_path: Path) -> None:
    hf = assets.smollm2_hf
    try:  # a failure, not a skip nor a fixture error, when llama.cpp's tool cannot be had
        llama_imatrix = llama_bin("llama-imatrix") / "llama-imatrix"
        smollm2_f32 = f32_gguf(hf)
    except LlamaBuildError as e:
        pytest.fail(f"could not build llama.cpp's llama-imatrix or convert SmolLM2:\n{e}")
    tok = load_tokenizer(hf)
    text = _cut_text((assets.canterbury / "alice29.txt").read_text("utf-8"), tok)
    text_path = tmp_path / "alice-start.txt"
    text_path.write_text(text, "utf-8")

    # The token ids llama-imatrix runs on: the first CHUNKS chunks of CTX, BOS first if added.
    n = CHUNKS * CTX
    ll_ids, bos = llama_tokens(smollm2_f32, text)
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert n <= len(hf_ids) < n + CTX, len(hf_ids)  # qtool's windows: all CHUNKS of them
    assert ll_ids[:n] == hf_ids[:n], "llama.cpp and HF tokenize the text differently"
    chunks = torch.tensor(ll_ids[:n], dtype=torch.long).view(CHUNKS, CTX)
    if bos is not None:
        chunks[:, 0] = bos

    ours = tmp_path / "qtool.imatrix.gguf"
    r = cli(
        "calibrate", hf, "-d", text_path, "-n", CHUNKS, "-L", CTX, "--device", "cpu",
        "--compute-dtype", "float32",  # llama-imatrix runs an F32 model in float32
        "-o", tmp_path / "stats.safetensors", "--imatrix", ours, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)["dataset"]
    assert sorted(d["windows"]) == list(range(CHUNKS))
    assert d["tokens_sha256"] == tokens_sha256(chunks[d["windows"]])

    ref = tmp_path / "llama.imatrix.gguf"
    p = subprocess.run(
        [
            llama_imatrix, "-m", smollm2_f32, "-f", text_path, "-o", ref,
            "-c", str(CTX), "-b", str(CTX), "--chunks", str(CHUNKS), "--no-ppl", "-t", "1",
            "-ctk", "f32", "-ctv", "f32", "-fa", "off",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]

    mine, theirs = load_imatrix(ours).entries, load_imatrix(ref).entries
    assert set(mine) == set(theirs) and len(theirs) == N_TENSORS
    rel = {}
    for name, r_ in theirs.items():
        q_ = mine[name]
        assert q_.sums.shape == r_.sums.shape, name
        assert q_.counts.tolist() == r_.counts.tolist() == [float(n)], name
        rs, qs = r_.sums.astype(np.float64).ravel(), q_.sums.astype(np.float64).ravel()
        rel[name] = float(np.linalg.norm(qs - rs) / np.linalg.norm(rs))
    worst = max(rel, key=rel.__getitem__)
    print(
        f"relative L2 difference of Σx² over {len(rel)} tensors: median "
        f"{np.median(list(rel.values())):.2e}, max {rel[worst]:.2e} ({worst})"
    )
    # float32 roundoff only: 4 x 256 tokens here gave median 4.9e-7, max 4.2e-6 (an ffn_down
    # input, whose outlier channels are ~2000x the median). Even llama.cpp's flash-attention
    # kernel (-fa on) moves attn_output inputs by ~2e-4 (scripts/check_imatrix.py).
    assert np.median(list(rel.values())) < 2e-6, sorted(rel.values())[N_TENSORS // 2]
    assert rel[worst] < 2e-5, (worst, rel[worst])
