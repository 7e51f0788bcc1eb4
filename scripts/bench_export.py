#!/usr/bin/env python3
"""Benchmark: HF bf16 checkpoint -> Q4_K_M GGUF, qtool vs llama.cpp's own route, same run.

llama.cpp's route is its converter (``convert_hf_to_gguf.py --outtype f16``, from the
llama-cpp-python sdist of the installed version) followed by ``llama_model_quantize``. Each step
runs in a fresh process; wall time and peak RSS (ru_maxrss of that process) are reported as JSON
on stdout. Models: the offline assets (SmolLM2-135M; Gemma 3 270M with ``--gemma``).

    python scripts/bench_export.py [--gemma] [--preset Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``cmd`` in a child; return wall seconds, its peak RSS in MiB, exit code, stderr tail."""
    probe = (
        "import resource, subprocess, sys, json, time;"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t,"
        " 'peak_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
        " 'stderr': p.stderr[-600:]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout)


def llama_src() -> Path:
    """llama.cpp's sources from the llama-cpp-python sdist (cached next to the assets)."""
    root = Path(os.environ.get("QTOOL_ASSETS", Path.home() / ".cache" / "qtool" / "assets"))
    dest = root / f"llama-cpp-python-{LLAMA_CPP_VERSION}"
    src = dest / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    dl = root / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sdists = list(dl.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    if not sdists:
        log("downloading the llama-cpp-python sdist for llama.cpp's converter")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(dl),
                f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            ],
            check=True,
        )
        sdists = list(dl.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    with tarfile.open(sdists[0]) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/conver" in m.name or "/vendor/llama.cpp/gguf-py/" in m.name
        ]
        tar.extractall(dest, members=members, filter="data")
    return src


def bench_model(name: str, hf: Path, preset: str, work: Path) -> dict[str, object]:
    from qtool.policy import PRESETS

    res: dict[str, object] = {"model": name, "preset": preset}
    qt_out = work / f"{name}-qtool.gguf"
    q = measured(
        [
            sys.executable,
            "-m",
            "qtool",
            "-q",
            "quantize",
            str(hf),
            "--method",
            "kquant",
            "--type",
            preset,
            "-o",
            str(qt_out),
        ]
    )
    q["bytes"] = qt_out.stat().st_size if qt_out.exists() else None
    res["qtool"] = q
    src = llama_src()
    f16 = work / f"{name}-f16.gguf"
    conv = measured(
        [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(hf),
            "--outtype",
            "f16",
            "--outfile",
            str(f16),
        ],
        env={"PYTHONPATH": str(src / "gguf-py")},
    )
    ref = {"convert": conv}
    if conv["rc"] == 0:
        ref_out = work / f"{name}-llama.gguf"
        quant_code = (
            "import ctypes, sys, llama_cpp;"
            "p = llama_cpp.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]);"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(),"
            " ctypes.byref(p)))"
        )
        ref["quantize"] = measured(
            [sys.executable, "-c", quant_code, str(f16), str(ref_out), str(PRESETS[preset][1])]
        )
        ok = ref["quantize"]["rc"] == 0
        ref["wall_s"] = conv["wall_s"] + ref["quantize"]["wall_s"] if ok else None
        ref["peak_rss_mib"] = max(conv["peak_rss_mib"], ref["quantize"]["peak_rss_mib"])
        if ok and q["rc"] == 0:
            import numpy as np
            from gguf import GGUFReader

            a = {t.name: t for t in GGUFReader(str(ref_out)).tensors}
            b = {t.name: t for t in GGUFReader(str(qt_out)).tensors}
            # llama.cpp quantizes from an F16 intermediate, qtool from the bf16 source, so
            # bytes differ where f16 rounding changed inputs; types must agree.
            res["same_types"] = (
                all(a[n].tensor_type == b[n].tensor_type for n in a) and a.keys() == b.keys()
            )
            res["identical_tensors"] = sum(
                np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in a
            )
            res["tensors"] = len(a)
        f16.unlink(missing_ok=True)
        ref_out.unlink(missing_ok=True)
    res["llama_cpp"] = ref
    if q["rc"] == 0 and ref.get("wall_s"):
        res["time_ratio_qtool_over_llama"] = q["wall_s"] / ref["wall_s"]  # type: ignore[operator]
        res["rss_ratio_qtool_over_llama"] = q["peak_rss_mib"] / ref["peak_rss_mib"]  # type: ignore[operator]
    qt_out.unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gemma", action="store_true", help="also Gemma 3 270M")
    ap.add_argument("--preset", default="Q4_K_M")
    args = ap.parse_args()
    cmd = [sys.executable, str(REPO / "scripts" / "assets.py")] + (
        ["--gemma"] if args.gemma else []
    )
    paths = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    models = [("smollm2-135m", Path(paths["smollm2_hf"]))]
    if args.gemma:
        models.append(("gemma3-270m", Path(paths["gemma3_hf"])))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, hf in models:
            log(f"{name}: qtool and llama.cpp, {args.preset}")
            results.append(bench_model(name, hf, args.preset, Path(tmp)))
    print(json.dumps({"benchmark": "export", "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
