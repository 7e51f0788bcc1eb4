#!/usr/bin/env python3
"""Encoder throughput, qtool vs llama.cpp, on the same rows in the same run (JSON on stdout).

For each type, with and without an importance matrix, single-threaded and on all cores, time
``qtool.kernels.quantize`` and llama.cpp's ``ggml_quantize_chunk`` (libggml from the installed
llama-cpp-python, through ctypes). llama.cpp's "all cores" is what llama-quantize does: the rows
split into one chunk per thread, each chunk quantized by ``ggml_quantize_chunk`` from its own
Python thread (ctypes releases the GIL). Each timing is the best of ``--repeat`` runs after a
warm-up (which also compiles or loads the numba kernels). The bytes are compared in the same run.

    python scripts/bench_codecs.py                      # all types, 256 rows x 4096
    python scripts/bench_codecs.py --types Q4_K,Q6_K --rows 512 --repeat 5

Logs go to stderr; stdout is one JSON document with a ``summary`` of qtool/llama.cpp ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from measure import best_time  # scripts/measure.py, beside this file
from qtool.kernels import QUANT_TYPES, codec_for, get_type, quantize
from qtool.kernels._ggml import load
from qtool.kernels.codec import default_threads


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def llama_quantize(g, qt, rows: np.ndarray, imatrix, threads: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.empty((rows.shape[0], qt.row_bytes(rows.shape[1])), np.uint8)
    if threads <= 1:
        g.quantize(qt, rows, imatrix, out=out)
        return out
    bounds = np.linspace(0, rows.shape[0], threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(g.quantize, qt, rows[a:b], imatrix, out[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if b > a
        ]
        for j in jobs:
            j.result()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--types", default=",".join(QUANT_TYPES), help="comma-separated type names")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--n", type=int, default=4096, help="row length (a multiple of 256)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads(), help="'all cores' count")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    g = load()
    rng = np.random.default_rng(args.seed)
    # Weight-like rows: mostly Gaussian with a heavy tail, as real layers are.
    rows = (rng.standard_normal((args.rows, args.n)) * 0.02).astype(np.float32)
    spots = rng.random(rows.shape) < 0.002
    rows[spots] *= 20.0
    imatrix = (rng.chisquare(1.0, args.n) * rng.lognormal(0, 1, args.n)).astype(np.float32)
    thread_counts = sorted({1, args.threads})
    log(f"libggml: {g.path}")
    log(f"input: {args.rows} x {args.n} float32, threads {thread_counts}, best of {args.repeat}")

    results = []
    summary: dict[str, dict[str, float]] = {}
    for name in args.types.split(","):
        qt = get_type(name)
        codec = codec_for(qt)
        for weighted in (False, True):
            im = imatrix if weighted else None
            path = "imatrix" if weighted and codec.uses_imatrix else "ref"
            if weighted and not codec.uses_imatrix:
                path = "imatrix(ignored)"
            backend = "fast" if codec.fast_kernel(weighted and codec.uses_imatrix) else "numpy"
            for threads in thread_counts:
                ours = quantize(rows, qt, im, threads=threads)  # warm-up (numba compile/load)
                theirs = llama_quantize(g, qt, rows, im, threads)
                identical = bool(np.array_equal(ours, theirs))
                t_q = best_time(lambda: quantize(rows, qt, im, threads=threads), args.repeat)  # noqa: B023
                t_l = best_time(lambda: llama_quantize(g, qt, rows, im, threads), args.repeat)  # noqa: B023
                mv_q = rows.size / t_q / 1e6
                mv_l = rows.size / t_l / 1e6
                ratio = t_l / t_q
                results.append(
                    {
                        "type": qt.name,
                        "path": path,
                        "threads": threads,
                        "backend": backend,
                        "qtool_mvalues_per_s": round(mv_q, 2),
                        "llama_mvalues_per_s": round(mv_l, 2),
                        "ratio": round(ratio, 3),
                        "identical": identical,
                    }
                )
                key = f"{'imatrix' if weighted else 'ref'}_{threads}t"
                summary.setdefault(qt.name, {})[key] = round(ratio, 3)
                log(
                    f"{qt.name:5s} {path:16s} {threads}t {backend:5s} qtool {mv_q:8.2f} Mv/s  "
                    f"llama.cpp {mv_l:8.2f} Mv/s  ratio {ratio:5.2f}  identical={identical}"
                )
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads_all": args.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "input": {"rows": args.rows, "n": args.n, "repeat": args.repeat, "seed": args.seed},
        "results": results,
        "summary": summary,
        "all_identical": all(r["identical"] for r in results),
    }
    json.dump(doc, sys.stdout, indent=1)
    print()
    return 0 if doc["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
