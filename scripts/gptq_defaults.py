#!/usr/bin/env python3
"""Which GPTQ settings should be the defaults: SmolLM2-135M, W4 group 64 symmetric, 128 x 512
Canterbury calibration tokens (``canterbury``: alice29, asyoulik, lcet10), scored by ONE
``qtool eval`` on Paradise Lost (not used for calibration; ctx 512, 20 windows) against the
base: PPL, KLD, top-1, plus each quantization's wall time.

Runs (each a fresh ``qtool quantize`` process, compressed-tensors output):

- ``rtn``: round to nearest on the same grid;
- ``gptq-natural-fp32``: the old defaults (natural column order, groups fitted as they start),
  float32 forwards;
- ``gptq-actorder-dynamic-fp32``: act-order with groups fitted as they start (AutoGPTQ's
  ``desc_act`` without static groups: a non-trivial ``g_idx``), float32;
- ``gptq-actorder-static-fp32``: act-order with static groups (the new defaults), float32;
- ``gptq-default``: the new defaults as a user runs them (compute dtype chosen for the device:
  bfloat16 forwards on CPUs with bf16 instructions, Hessians in float32).

    .venv/bin/python scripts/gptq_defaults.py --out gptq-defaults.json

JSON on stdout (and ``--out``), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS: dict[str, list[str]] = {
    "rtn": ["--method", "rtn"],
    "gptq-natural-fp32": ["--method", "gptq", "--no-act-order", "--compute-dtype", "float32"],
    "gptq-actorder-dynamic-fp32": [
        "--method",
        "gptq",
        "--no-static-groups",
        "--compute-dtype",
        "float32",
    ],
    "gptq-actorder-static-fp32": ["--method", "gptq", "--compute-dtype", "float32"],
    "gptq-default": ["--method", "gptq"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--src", default=str(Path.home() / ".cache/qtool/assets/smollm2-135m-instruct-hf")
    )
    ap.add_argument("--work", default="/tmp/qtool-gptq-defaults")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--out")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    q = [sys.executable, "-m", "qtool"]
    res: dict[str, dict] = {}
    for label in a.runs.split(","):
        out = work / label
        cmd = [*q, "quantize", a.src, *RUNS[label], "--bits", "4", "-g", "64", "--sym",
               "--format", "compressed-tensors", "--device", "cpu", "-o", str(out),
               "--json"]  # fmt: skip
        if label != "rtn":
            cmd += ["-d", "canterbury", "-n", str(a.samples), "-L", str(a.seq_len)]
        print(f"[{label}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if r.returncode:
            sys.exit(f"{label} failed: {r.stderr[-2000:]}")
        d = json.loads(r.stdout)
        res[label] = {
            "command": "qtool " + " ".join(cmd[3:]),
            "seconds": round(time.perf_counter() - t0, 1),
            "compute": d.get("gptq"),
        }
    ev = [*q, "eval", *(str(work / k) for k in res), "--base", a.src, "--dataset",
          "canterbury:plrabn12.txt", "--ctx", "512", "--chunks", "20", "--json"]  # fmt: skip
    print(f"[eval] {' '.join(ev[2:])}", file=sys.stderr, flush=True)
    r = subprocess.run(ev, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"eval failed: {r.stderr[-2000:]}")
    e = json.loads(r.stdout)
    for row in e["artifacts"]:
        label = Path(row["source"]).name
        res[label]["eval"] = {
            "ppl": row["ppl"],
            "kld_mean": row["kld"]["mean"],
            "top1": row["top1"],
            "bits_per_weight": row["bits_per_weight"],
        }
    report = {"base_ppl": e["base"]["ppl"], "runs": res, "eval_raw": e}
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
