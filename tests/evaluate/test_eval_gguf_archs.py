"""``qtool eval``'s GGUF decoding for every supported architecture, against llama.cpp running the
same files (``--backend llama.cpp``, llama-cpp-python) and against the HF base model.

Per architecture (tiny random 2-layer models from helpers.build_tiny, a 1024-token cut of
SmolLM2's tokenizer), qtool writes Q8_0, F16 and F32 GGUFs of the checkpoint; ``qtool eval``
scores them on 2 windows of 64 tokens of a small local text (the opening of Canterbury's
alice29.txt, the text of the other eval tests), once decoded into the base architecture
(torch) and once run by llama.cpp.

Tolerances (measured over the five architectures, this text, ctx 64 x 2):
- Q8_0, decoded vs llama.cpp PPL: llama.cpp quantizes the activations of quantized matmuls to
  8 bits (ggml-cpu ``vec_dot_type`` Q8_0) and keeps an F16 KV cache, qtool decodes exactly and
  multiplies in float32. Measured 0.01% to 0.065%, and 0.25% for gemma3; bound 0.5%.
  Decoded KLD against the base: measured 3.7e-6 to 5.2e-5 (gemma3); bound 0 < KLD < 2e-4.
  It must also be below the KLD of llama.cpp's run of the same file (measured ratio 0.56 to
  0.64): llama.cpp adds its activation rounding to the same weight error, and independent
  errors add in KLD, so a decoder adding error of its own shows here even on these
  near-uniform random models (a K permutation with the wrong head count: decoded KLD 1.2e-4
  against llama.cpp's 1.4e-5).
- F32: decoding is exact (the checkpoint is bf16), so KLD is exactly 0 and the PPL equals the
  base's; F16: bf16 -> f16 is exact but for values below f16's range, measured |ΔPPL| / PPL
  <= 3.3e-8 and KLD <= 5e-14; bounds 1e-6 and 1e-10.
- F32/F16 run by llama.cpp (float matmuls, F16 KV cache) against the decoded PPL: measured
  <= 2.6e-5 relative (gemma3), KLD against the base <= 8.7e-8; bounds 2e-4 and 1e-6. This is
  the independent check that eval's decoding is the model llama.cpp runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.export.helpers import build_tiny

ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]
TP = ("--tokenizer-pre", "smollm")
CTX, CHUNKS = 64, 2

Q8_PPL_REL = 5e-3
Q8_KLD = 2e-4
F16_PPL_REL, F16_KLD = 1e-6, 1e-10
LLAMA_FLOAT_PPL_REL, LLAMA_FLOAT_KLD = 2e-4, 1e-6


def _eval(cli, *args: object) -> dict[str, Any]:
    r = cli("eval", *args, "--json")
    assert r.exit_code == 0, r.stderr
    return r.json()


@pytest.mark.parametrize("arch", ARCHS)
def test_decoded_gguf_matches_llama_cpp(cli, assets, tmp_path: Path, arch: str) -> None:
    model = build_tiny(tmp_path / "model", arch, assets.smollm2_hf)
    text = tmp_path / "text.txt"
    text.write_text((assets.canterbury / "alice29.txt").read_text()[:6000], encoding="utf-8")
    files = {t: tmp_path / f"model-{t.lower()}.gguf" for t in ("Q8_0", "F16", "F32")}
    r = cli("-q", "quantize", model, "--method", "kquant", "--type", "Q8_0", "-o",
            files["Q8_0"], *TP)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    for t in ("F16", "F32"):
        r = cli("-q", "export", model, "--outtype", t, "-o", files[t], *TP)
        assert r.exit_code == 0, r.stderr

    common = ("--base", model, "--dataset", text, "--ctx", CTX, "--chunks", CHUNKS,
              "--threads", 1)  # fmt: skip
    dec = _eval(cli, *files.values(), *common)
    ref = _eval(cli, *files.values(), *common, "--backend", "llama.cpp")
    assert dec["tokens"]["scored"] == ref["tokens"]["scored"] == CHUNKS * (CTX - 1)
    base = dec["base"]["ppl"]
    assert ref["base"]["ppl"] == base  # the same torch base in both runs
    d = dict(zip(files, dec["artifacts"], strict=True))
    g = dict(zip(files, ref["artifacts"], strict=True))
    for t in files:
        assert d[t]["kind"] == "gguf" and d[t]["backend"] == "torch"
        assert g[t]["backend"] == "llama.cpp"
    rel = lambda a, b: abs(a / b - 1)  # noqa: E731
    q8d, q8g = d["Q8_0"], g["Q8_0"]
    print(f"{arch}: base PPL {base:.4f}")
    print(
        f"  Q8_0 decoded {q8d['ppl']:.4f} (KLD {q8d['kld']['mean']:.2e}), llama.cpp "
        f"{q8g['ppl']:.4f} (KLD {q8g['kld']['mean']:.2e}): {rel(q8d['ppl'], q8g['ppl']):.2e}"
    )
    for t in ("F16", "F32"):
        print(
            f"  {t} decoded vs base {rel(d[t]['ppl'], base):.1e} (KLD {d[t]['kld']['mean']:.1e}),"
            f" llama.cpp vs decoded {rel(g[t]['ppl'], d[t]['ppl']):.1e} "
            f"(KLD {g[t]['kld']['mean']:.1e})"
        )

    # Q8_0: the decoded file against llama.cpp running it, and close to the base
    assert rel(d["Q8_0"]["ppl"], g["Q8_0"]["ppl"]) < Q8_PPL_REL
    assert 0.0 < d["Q8_0"]["kld"]["mean"] < Q8_KLD
    assert d["Q8_0"]["kld"]["mean"] < g["Q8_0"]["kld"]["mean"]
    assert d["Q8_0"]["top1"] >= 0.9

    # F32 decodes to the base's weights exactly, F16 to within f16's range
    assert d["F32"]["kld"]["max"] == 0.0 and d["F32"]["ppl"] == base
    assert rel(d["F16"]["ppl"], base) < F16_PPL_REL and d["F16"]["kld"]["mean"] < F16_KLD

    # llama.cpp's float runs of the same files: the decoding is the model llama.cpp runs
    for t in ("F16", "F32"):
        assert rel(g[t]["ppl"], d[t]["ppl"]) < LLAMA_FLOAT_PPL_REL, t
        assert g[t]["kld"]["mean"] < LLAMA_FLOAT_KLD, t
