"""llama.cpp's own HF -> GGUF converter (``convert_hf_to_gguf.py`` of the llama-cpp-python
sdist qtool's reference library is built from) as the reference for qtool's GGUF export.

The sources are fetched once (``pip download`` of the sdist, unpacked, by
``scripts/build_llama_tools.sh --src``) into a cache folder outside git,
``~/.cache/qtool/llama-src`` (or ``$QTOOL_LLAMA_SRC``). The converter runs in
a subprocess of this venv's Python with its own ``gguf-py`` first on the path, as it runs from
a llama.cpp checkout. The only thing the harness adds: the tiny test models use SmolLM2's
tokenizer cut to 1024 ids, whose check-text hash llama.cpp's table cannot know; when the
converter does not recognise a pre-tokenizer, the harness names it (``pre``) instead of
letting the converter stop. A recognised hash is never overridden.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from llama_tools import llama_src  # noqa: E402


def llama_cpp_source() -> Path:
    """llama.cpp's sources (the folder holding ``convert_hf_to_gguf.py``) of the installed
    llama-cpp-python, fetched and unpacked on first use by ``scripts/build_llama_tools.sh
    --src``: one fetcher, under one lock, for these tests, the moe tests and the tool build
    (several test workers may ask at once). Raises RuntimeError (``LlamaBuildError``) when
    they cannot be had."""
    src = llama_src()
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{src}: no convert_hf_to_gguf.py inside")
    return src


# Runs convert_hf_to_gguf.py as __main__ (once per argument list; lists separated by "--then")
# after putting its folder and gguf-py first on the path and wrapping the pre-tokenizer lookup
# (see the module docstring).
_WRAPPER = """
import runpy, sys
src, pre, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
lookup = base.TextModel.get_vocab_base_pre
def named_if_unknown(self, tokenizer):
    try:
        return lookup(self, tokenizer)
    except NotImplementedError:
        if not pre:
            raise
        return pre
base.TextModel.get_vocab_base_pre = named_if_unknown
runs = [[]]
for a in args:
    if a == "--then":
        runs.append([])
    else:
        runs[-1].append(a)
for argv in runs:
    sys.argv = [src + "/convert_hf_to_gguf.py", *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src: Path, model: Path, outs: dict[str, Path], *, pre: str = "") -> None:
    """``convert_hf_to_gguf.py MODEL --outtype T --outfile F`` for each ``{T: F}`` of ``outs``
    (``f32``, ``f16``...), in one process."""
    convert_many(src, [(model, outs)], pre=pre)


def convert_many(src: Path, jobs: list[tuple[Path, dict[str, Path]]], *, pre: str = "") -> None:
    """:func:`convert` for several models in one process (one torch and transformers import
    for all of them: most of a conversion's time for a tiny model)."""
    args: list[str] = []
    for model, outs in jobs:
        for outtype, out in outs.items():
            args += [*(["--then"] if args else []), str(model), "--outtype", outtype,
                     "--outfile", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(src), pre, *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, f"convert_hf_to_gguf.py failed:\n{proc.stderr[-4000:]}"


def metadata(path: Path) -> dict[str, Any]:
    """Every key of a GGUF file but the reader's own (``GGUF.*``), values as Python values
    (arrays as lists, strings decoded, floats as float32 values)."""
    from gguf import GGUFReader, GGUFValueType

    out: dict[str, Any] = {}
    for f in GGUFReader(str(path)).fields.values():
        if f.name.startswith("GGUF."):
            continue
        v = f.contents()
        if f.types and f.types[-1] == GGUFValueType.FLOAT32:
            v = [float(np.float32(x)) for x in v] if isinstance(v, list) else float(np.float32(v))
        out[f.name] = (f.types[0].name, v)
    return out


def metadata_diff(ref: dict[str, Any], mine: dict[str, Any], ignore: set[str]) -> list[str]:
    """Keys whose presence, type or value differ (``ignore``: intended differences)."""
    out = []
    for k in sorted(set(ref) | set(mine)):
        if k in ignore:
            continue
        if k not in mine:
            out.append(f"{k}: only llama.cpp ({_short(ref[k])})")
        elif k not in ref:
            out.append(f"{k}: only qtool ({_short(mine[k])})")
        elif ref[k] != mine[k]:
            out.append(f"{k}: llama.cpp {_short(ref[k])} vs qtool {_short(mine[k])}")
    return out


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 120 else s[:117] + "..."


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """{name: (type, shape in gguf order, bytes)}."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {
        t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
        for t in r.tensors
    }


def tensor_diff(ref: Path, mine: Path) -> list[str]:
    """Tensors missing on one side or differing in type, shape or bytes."""
    a, b = tensors(ref), tensors(mine)
    out = [f"{n}: only llama.cpp" for n in sorted(set(a) - set(b))]
    out += [f"{n}: only qtool" for n in sorted(set(b) - set(a))]
    for n in sorted(set(a) & set(b)):
        (ta, sa, da), (tb, sb, db) = a[n], b[n]
        if (ta, sa) != (tb, sb):
            out.append(f"{n}: llama.cpp {ta}{list(sa)} vs qtool {tb}{list(sb)}")
        elif da != db:
            out.append(f"{n}: bytes differ")
    return out
