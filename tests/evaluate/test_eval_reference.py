"""``qtool eval``'s numbers against independent computations on the real assets.

- an HF checkpoint: transformers' own loss (``labels=``) on the same windows;
- a GGUF: llama.cpp's logits (llama-cpp-python) on the same tokens and windows. qtool decodes
  the weights exactly and multiplies in float32; llama.cpp quantizes the activations to 8 bits
  inside its quantized dot products (ggml-cpu ``vec_dot_type``: q8_1 for Q4_1, q8_K for
  k-quants), so the two perplexities differ by a fraction of a percent: within 1% is required.

Windows are rebuilt here from the tokenizer and llama-perplexity's rules, not taken from qtool.
SmolLM2 runs in the default suite (short windows); Gemma 3 is ``slow``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Assets

TEXT = "alice29.txt"


def windows_of(tokenizer_src: Path, text: str, ctx: int, n: int) -> np.ndarray:
    """perplexity.cpp's windows: tokens of the whole text (BOS first if the tokenizer adds it),
    consecutive chunks of ctx, BOS over the first token of each chunk."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
    bos = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    w = ids[: n * ctx].reshape(n, ctx).copy()
    if bos:
        w[:, 0] = tok.bos_token_id
    return w


def nll_rows(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
    """-log p(window[t+1] | window[:t+1]) for every position t of a window, float64."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(window) - 1), window[1:]]


def llama_cpp_nll(gguf: Path, windows: np.ndarray) -> np.ndarray:
    """(n, ctx - 1) NLLs from llama.cpp's logits."""
    from qtool.evaluate.llamacpp import open_llama

    llm = open_llama(gguf, windows.shape[1], threads=1)
    out = []
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        out.append(nll_rows(np.array(llm.scores[: len(w)], dtype=np.float32), w))
    llm.close()
    return np.stack(out)


def ppl(nll: np.ndarray, first: int = 0) -> float:
    return math.exp(float(nll[:, first:].mean()))


def run_eval(cli, *args: object) -> dict[str, Any]:
    r = cli("eval", *args, "--threads", "1", "--json")
    assert r.exit_code == 0, r.stderr
    return r.json()


# --- SmolLM2 (default suite) ------------------------------------------------------------------

CTX, N = 128, 2


@pytest.fixture(scope="module")
def smol_windows(assets: Assets) -> np.ndarray:
    return windows_of(assets.smollm2_hf, (assets.canterbury / TEXT).read_text(), CTX, N)


def test_hf_perplexity_equals_transformers_loss(cli, assets: Assets, smol_windows) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    d = run_eval(cli, assets.smollm2_hf, "--base", assets.smollm2_hf,
                 "--dataset", f"canterbury:{TEXT}", "--ctx", CTX, "--chunks", N)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_hf, dtype=torch.float32)
    losses, nll64 = [], []
    with torch.inference_mode():
        for w in smol_windows:
            x = torch.as_tensor(w)[None]
            out = model(input_ids=x, labels=x)
            losses.append(out.loss.item())  # transformers' float32 cross-entropy
            nll64.append(nll_rows(out.logits[0].numpy(), w))
    ours = d["base"]["ppl"]
    # transformers reduces in float32 (log-sum-exp over 49152 logits): ~1e-5 relative apart
    assert ours == pytest.approx(math.exp(np.mean(losses)), rel=2e-5)
    # the same logits reduced in float64 agree to rounding
    assert ours == pytest.approx(ppl(np.stack(nll64)), rel=1e-7)
    a = d["artifacts"][0]
    assert a["kld"]["max"] == 0.0 and a["top1"] == 1.0 and a["ppl"] == ours


@pytest.fixture(scope="module")
def smol_llama_nll(assets: Assets, smol_windows) -> np.ndarray:
    return llama_cpp_nll(assets.smollm2_gguf, smol_windows)


def test_smollm2_q4_1_decoded_vs_llama_cpp(cli, assets: Assets, smol_llama_nll) -> None:
    d = run_eval(cli, assets.smollm2_gguf, "--base", assets.smollm2_hf,
                 "--dataset", f"canterbury:{TEXT}", "--ctx", CTX, "--chunks", N)  # fmt: skip
    ours, ref = d["artifacts"][0]["ppl"], ppl(smol_llama_nll)
    print(f"SmolLM2 Q4_1 ctx {CTX}x{N}: qtool {ours:.4f}, llama.cpp {ref:.4f}, "
          f"{100 * (ours / ref - 1):+.3f}%")  # fmt: skip
    assert abs(ours / ref - 1) < 0.01
    assert d["artifacts"][0]["bits_per_weight"] == pytest.approx(5.74, abs=0.01)


def test_llama_cpp_backend_second_half(cli, assets: Assets, smol_llama_nll) -> None:
    """--backend llama.cpp with llama-perplexity's second-half scoring gives llama.cpp's own
    perplexity of those positions."""
    d = run_eval(cli, assets.smollm2_gguf, "--base", assets.smollm2_hf, "--backend", "llama.cpp",
                 "--scoring", "second-half", "--dataset", f"canterbury:{TEXT}", "--ctx", CTX,
                 "--chunks", N)  # fmt: skip
    a = d["artifacts"][0]
    assert a["backend"] == "llama.cpp" and d["tokens"]["scored"] == N * (CTX - 1 - CTX // 2)
    assert a["ppl"] == pytest.approx(ppl(smol_llama_nll, first=CTX // 2), rel=1e-6)


# --- Gemma 3 (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma3_q4_k_m_decoded_vs_llama_cpp(cli, assets: Assets) -> None:
    assert assets.gemma3_gguf and assets.gemma3_hf, "run `make assets-gemma`"
    ctx, n = 512, 4
    text = (assets.canterbury / TEXT).read_text()
    windows = windows_of(assets.gemma3_hf, text, ctx, n)
    ref_nll = llama_cpp_nll(assets.gemma3_gguf, windows)
    d = run_eval(cli, assets.gemma3_gguf, "--base", assets.gemma3_hf,
                 "--dataset", f"canterbury:{TEXT}", "--ctx", ctx, "--chunks", n)  # fmt: skip
    assert d["settings"]["bos"] is True
    ours, ref = d["artifacts"][0]["ppl"], ppl(ref_nll)
    print(f"Gemma 3 Q4_K_M ctx {ctx}x{n}: qtool {ours:.4f}, llama.cpp {ref:.4f}, "
          f"{100 * (ours / ref - 1):+.3f}%")  # fmt: skip
    assert abs(ours / ref - 1) < 0.01


@pytest.mark.slow
def test_gemma3_header_reader(assets: Assets) -> None:
    from qtool.evaluate.gguf_header import read_gguf_header
    from tests.gguf_reference import gguf_py_read as read_gguf

    assert assets.gemma3_gguf, "run `make assets-gemma`"
    assert read_gguf_header(assets.gemma3_gguf) == read_gguf(assets.gemma3_gguf)


@pytest.mark.slow
def test_gguf_base_self_and_against_hf(cli, assets: Assets) -> None:
    """A GGUF as --base: config and tokenizer through transformers' GGUF loader; the file
    against itself is KLD 0, and its PPL is the one it has as an artifact of the HF base."""
    args = ("--dataset", f"canterbury:{TEXT}", "--ctx", 128, "--chunks", 2)
    d = run_eval(cli, assets.smollm2_gguf, "--base", assets.smollm2_gguf, *args)
    a = d["artifacts"][0]
    assert a["kld"]["max"] == 0.0 and a["top1"] == 1.0
    d2 = run_eval(cli, assets.smollm2_gguf, "--base", assets.smollm2_hf, *args)
    assert d2["artifacts"][0]["ppl"] == pytest.approx(d["base"]["ppl"], rel=1e-9)
