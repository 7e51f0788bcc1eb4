"""Shared helpers for the llama.cpp comparisons (check_imatrix.py, imatrix_ppl.py and
tests/calibrate/test_imatrix_reference.py).

llama.cpp's tools are built from the sources vendored in the llama-cpp-python sdist by
scripts/build_llama_tools.sh into a cache folder outside git (~/.cache/qtool/llama-build),
linked against the installed llama_cpp package's libraries; the F32 GGUF of SmolLM2 is made
from the HF asset with that llama.cpp's own convert_hf_to_gguf.py. Nothing here is committed
output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("QTOOL_LLAMA_WORK", Path.home() / ".cache" / "qtool" / "llama-work"))
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")


class LlamaBuildError(RuntimeError):
    """scripts/build_llama_tools.sh could not fetch the sources or build the tools."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def assets() -> dict[str, str]:
    """The offline asset paths (prepared on first use by scripts/assets.py)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "assets.py")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def _build_script(*args: str) -> Path:
    """Run scripts/build_llama_tools.sh with this interpreter; the path it prints last."""
    cmd = ["bash", str(REPO / "scripts" / "build_llama_tools.sh"), *args]
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True
    )
    if p.returncode != 0 or not p.stdout.strip():
        raise LlamaBuildError(f"{' '.join(cmd[1:])} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    if p.stderr.strip():  # something was fetched or built (a no-op run is silent)
        log(f"{' '.join(cmd[1:])}: {time.perf_counter() - t0:.0f} s")
    return Path(p.stdout.strip().splitlines()[-1])


def llama_src() -> Path:
    """llama.cpp's sources from the llama-cpp-python sdist (fetched from PyPI when missing)."""
    return _build_script("--src")


def llama_bin(*tools: str) -> Path:
    """The folder holding llama.cpp's ``tools`` (default: all of TOOLS), built when missing
    (scripts/build_llama_tools.sh: cached, a no-op when already built)."""
    return _build_script(*(tools or TOOLS))


def llama_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def f32_gguf(hf: Path, name: str = "smollm2") -> Path:
    """An F32 GGUF of the HF checkpoint ``hf`` made by llama.cpp's convert_hf_to_gguf.py (the
    llama-cpp-python sdist's), cached in WORK under ``name`` and the llama.cpp version."""
    out = WORK / f"{name}-f32-llama-cpp-python-{llama_version()}.gguf"
    if out.exists():
        return out
    src = llama_src()
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    log(f"converting {hf} to {out} with convert_hf_to_gguf.py --outtype f32")
    p = subprocess.run(
        [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(hf),
            "--outtype",
            "f32",
            "--outfile",
            str(tmp),
        ],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LlamaBuildError(f"convert_hf_to_gguf.py failed ({p.returncode}):\n{p.stderr[-4000:]}")
    tmp.rename(out)
    return out


def llama_tokens(gguf: Path, text: str) -> tuple[list[int], int | None]:
    """llama.cpp's tokens for ``text`` as llama-imatrix makes them (add_special=true,
    parse_special=false), and the BOS id when the vocab adds one."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        bos = llm.token_bos() if llama_cpp.llama_vocab_get_add_bos(vocab) else None
    finally:
        llm.close()
    return list(ids), bos


def run(cmd: list[str], *, log_to: Path | None = None) -> str:
    """Run a llama.cpp tool; return its combined output (kept in ``log_to`` when given)."""
    log(" ".join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    text = p.stdout + p.stderr
    if log_to is not None:
        log_to.write_text(text)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{text[-3000:]}")
    return text


def perplexity(text: str) -> tuple[float, float]:
    """``Final estimate: PPL = X +/- Y`` from llama-perplexity's output."""
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if not m:
        raise SystemExit(f"no final PPL estimate in llama-perplexity's output:\n{text[-2000:]}")
    return float(m.group(1)), float(m.group(2))
