"""qtool's imatrix against llama.cpp's own tools (slow: builds llama.cpp's tools once).

Both run the scripts in scripts/, which build llama-imatrix, llama-quantize and
llama-perplexity from the llama-cpp-python sdist's sources (scripts/build_llama_tools.sh) into a
folder outside git when they are missing. They fail, never skip, when that cannot be done.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script(name: str, *args: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_imatrix_matches_llama_imatrix(tmp_path: Path) -> None:
    p = _script("check_imatrix.py", "--chunks", "4", "--ctx", "256", out=tmp_path / "c.json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((tmp_path / "c.json").read_text())["summary"]
    assert s["tensors_compared"] == 210 and s["counts_equal"] and s["tokenizations_agree"]
    assert s["rel_l2_max"] < 1e-5  # float32 roundoff (llama.cpp with -fa off, F32 KV cache)


@pytest.mark.slow
def test_imatrix_lowers_perplexity(tmp_path: Path) -> None:
    p = _script("imatrix_ppl.py", out=tmp_path / "p.json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "p.json").read_text())
    assert all(r["imatrix_better"].values()), r["results"]
