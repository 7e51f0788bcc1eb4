"""A run whose hidden-state cache is larger than ``--max-memory`` stays under it.

A synthetic Llama at a small width is calibrated on enough tokens that the hidden states alone
(tokens x hidden x 4 bytes) exceed the cap; the memory plan must put them (and GPTQ's saved
layer inputs) on memory-mapped disk, and the child's own peak RSS (``scripts/measure.py``)
must stay under the cap. Marked slow: a million tokens through the layers takes minutes on two
cores (figures in the README's scale section).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.calibrate.test_calibrate_memory import GIB, peak_rss_of, write_synthetic_llama
from tests.conftest import with_tokenizer

HIDDEN, SAMPLES, SEQ = 256, 1000, 1024
CAP = int(0.9 * GIB)
CANTERBURY = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, assets) -> Path:
    model = tmp_path_factory.mktemp("cap") / "synthetic"
    write_synthetic_llama(model, hidden=HIDDEN, intermediate=512, layers=1)
    with_tokenizer(model, assets)
    # a million tokens: the four Canterbury texts six times over (the named set has 172k)
    texts = [(assets.canterbury / f).read_text(encoding="utf-8") for f in CANTERBURY]
    (model.parent / "text.txt").write_text("\n\n".join(texts * 6), encoding="utf-8")
    return model


def _run(args: list[str], text: Path) -> tuple[int, int, str]:
    cache = SAMPLES * SEQ * HIDDEN * 4
    assert cache > CAP, "the hidden-state cache must exceed the cap"
    cmd = [sys.executable, "-m", "qtool", "-v", *args, "-d", str(text), "-n", str(SAMPLES),
           "-L", str(SEQ), "--device", "cpu", "--compute-dtype", "float32",
           "--max-memory", str(CAP)]  # fmt: skip
    code, peak, err = peak_rss_of(cmd)
    print(f"\nhidden-state cache {cache / GIB:.2f} GiB, cap {CAP / GIB:.2f} GiB, "
          f"peak RSS {peak / GIB:.2f} GiB")  # fmt: skip
    return code, peak, err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["calibrate", "gptq"])
def test_cache_larger_than_the_cap(synthetic: Path, tmp_path: Path, command: str) -> None:
    if command == "calibrate":
        args = ["calibrate", str(synthetic), "-o", str(tmp_path / "s.safetensors")]
    else:
        args = ["quantize", str(synthetic), "--method", "gptq", "--bits", "4", "-g", "128",
                "-o", str(tmp_path / "q")]  # fmt: skip
    code, peak, err = _run(args, synthetic.parent / "text.txt")
    assert code == 0, err[-2000:]
    assert "disk" in err, "the plan should have put the caches on disk"
    assert peak < CAP, f"peak RSS {peak / GIB:.2f} GiB over the {CAP / GIB:.2f} GiB cap"
