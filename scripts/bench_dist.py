"""``--nproc N`` against one process on the CPU: the speed-up of N gloo processes, and whether
their outputs are byte-identical to the single-process run's.

Two commands on SmolLM2-135M (the offline assets), each run three times in the same session: as
one process (torch's default threads: every core), with ``--nproc N`` (N processes of
``cores / N`` threads each: the same cores), and as one process of ``cores / N`` threads (what
one worker has: the speed-up that is not the threads' own overhead). ``qtool quantize
--method gptq`` writes a compressed-tensors folder; ``qtool calibrate --hessian`` writes a
stats file and an imatrix.
Wall times include process start-up (each run is a fresh command, as a user runs it). JSON on
stdout (or ``--out``) with the ratios of the same run.

    python scripts/bench_dist.py                 # 32 x 256 tokens, --nproc 2
    python scripts/bench_dist.py --quick         # 8 x 128 tokens
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def smollm2() -> Path:
    args = [sys.executable, str(REPO / "scripts" / "assets.py")]
    paths = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    return Path(paths["smollm2_hf"])


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="8 x 128 tokens")
    ap.add_argument("--only", choices=["gptq", "calibrate"], default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        a.samples, a.seq_len = 8, 128
    model = smollm2()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # one process: every core; --nproc: cores / N each
    qtool = [sys.executable, "-m", "qtool"]
    data = ["-d", "canterbury", "-n", str(a.samples), "-L", str(a.seq_len)]
    gptq = ["--method", "gptq", "--bits", "4", "-g", "64", "--format", "compressed-tensors"]
    fp32 = ["--compute-dtype", "float32"]
    commands = {
        "gptq": lambda out: (
            ["quantize", str(model), *gptq, *fp32, *data, "-o", str(out / "w4")],
            [out / "w4" / "model.safetensors"],
        ),
        "calibrate": lambda out: (
            [
                "calibrate",
                str(model),
                *data,
                "--hessian",
                *fp32,
                "-o",
                str(out / "stats.safetensors"),
                "--imatrix",
                str(out / "imatrix.gguf"),
            ],  # fmt: skip
            [out / "stats.safetensors", out / "imatrix.gguf"],
        ),
    }
    report: dict[str, object] = {
        "model": "SmolLM2-135M-Instruct (bf16 checkpoint, float32 compute)",
        "tokens": f"{a.samples} x {a.seq_len}",
        "cpus": os.cpu_count(),
        "nproc": a.nproc,
        "threads_one_process": os.cpu_count(),
        "threads_per_process": max(1, (os.cpu_count() or 1) // a.nproc),
        "runs": {},
    }
    runs: dict[str, object] = {}
    per = max(1, (os.cpu_count() or 1) // a.nproc)
    for name, make in commands.items():
        if a.only and name != a.only:
            continue
        with tempfile.TemporaryDirectory(prefix="qtool-bench-dist-") as tmp:
            one, many = Path(tmp) / "one", Path(tmp) / "many"
            one.mkdir()
            many.mkdir()
            args1, files1 = make(one)
            argsn, filesn = make(many)
            few = Path(tmp) / "few"
            few.mkdir()
            argsf, filesf = make(few)
            t1 = timed(qtool + args1, env)
            tn = timed(qtool + argsn + ["--nproc", str(a.nproc)], env)
            tf = timed(qtool + argsf, {**env, "OMP_NUM_THREADS": str(per)})
            d1, dn, df = digest(files1), digest(filesn), digest(filesf)
            runs[name] = {
                "one_process_s": round(t1, 2),
                f"{a.nproc}_processes_s": round(tn, 2),
                "speedup": round(t1 / tn, 3),
                f"one_process_{per}_threads_s": round(tf, 2),
                f"speedup_vs_one_process_{per}_threads": round(tf / tn, 3),
                "identical_output": d1 == dn == df,
                "sha256": d1,
            }
            print(f"{name}: {runs[name]}", file=sys.stderr)
    report["runs"] = runs
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
