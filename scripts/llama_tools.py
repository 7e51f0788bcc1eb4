"""Shared helpers for the llama.cpp comparison scripts (check_imatrix.py, imatrix_ppl.py).

llama.cpp's tools are built from the sources vendored in the llama-cpp-python sdist by
scripts/build_llama_tools.sh into a folder outside git; the F32 GGUF of SmolLM2 is made from
the HF asset with that llama.cpp's own convert_hf_to_gguf.py. Nothing here is committed output.
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
LLAMA_SRC = Path(
    os.environ.get("QTOOL_LLAMA_SRC", "/tmp/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp")
)
BUILD = Path(os.environ.get("QTOOL_LLAMA_BUILD", Path.home() / ".cache" / "qtool" / "llama-build"))
WORK = Path(os.environ.get("QTOOL_LLAMA_WORK", Path.home() / ".cache" / "qtool" / "llama-work"))
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")


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


def llama_bin(build: bool = True) -> Path:
    """The folder with llama-imatrix/-quantize/-perplexity, building them when missing."""
    bindir = BUILD / "bin"
    if all((bindir / t).exists() for t in TOOLS):
        return bindir
    if not build:
        raise SystemExit(f"llama.cpp tools missing in {bindir}: run scripts/build_llama_tools.sh")
    log(f"building llama.cpp tools into {BUILD} (several minutes)")
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build_llama_tools.sh"), str(LLAMA_SRC), str(BUILD)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return bindir


def f32_gguf(hf: Path, name: str = "smollm2-f32.gguf") -> Path:
    """An F32 GGUF of the HF checkpoint ``hf`` made by llama.cpp's convert_hf_to_gguf.py."""
    out = WORK / name
    if out.exists():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    log(f"converting {hf} to {out} with convert_hf_to_gguf.py --outtype f32")
    subprocess.run(
        [
            sys.executable,
            str(LLAMA_SRC / "convert_hf_to_gguf.py"),
            str(hf),
            "--outtype",
            "f32",
            "--outfile",
            str(tmp),
        ],
        check=True,
        capture_output=True,
    )
    tmp.rename(out)
    return out


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
