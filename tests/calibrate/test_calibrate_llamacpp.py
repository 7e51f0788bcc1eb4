"""qtool's imatrix makes llama.cpp's quantizations better (slow: builds llama-quantize and
llama-perplexity once, quantizes twice per type and runs perplexity).

The direct check against llama-imatrix is in the default suite (test_imatrix_reference.py);
scripts/check_imatrix.py runs it on more chunks. The tools come from
scripts/build_llama_tools.sh (llama-cpp-python sdist, outside git, cached); the test fails,
never skips, when they cannot be built.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_imatrix_lowers_perplexity(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "imatrix_ppl.py"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert all(r["imatrix_better"].values()), r["results"]
