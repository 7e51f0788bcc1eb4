"""Quality and cost of ``qtool quantize --method rtn|gptq``: FP vs RTN vs GPTQ at several bit
widths with group size 128, with and without MSE clipping.

Each configuration runs ``qtool quantize`` in a fresh process (wall time and that process's
own peak RSS, ``scripts/measure.py``); then one ``qtool eval`` pass scores every artifact
against the float model on a Canterbury text that calibration never sees (plrabn12.txt: the
``canterbury`` calibration set leaves it out). Output: a JSON report on stdout (or ``--out``)
and a markdown table on stderr.

    python scripts/bench_quantize.py                       # SmolLM2, 8/4/3 bits, 128 x 512
    python scripts/bench_quantize.py --model gemma3 --bits 4 3
    python scripts/bench_quantize.py --only gptq --bits 4  # the GPTQ timing benchmark alone
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_captured  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def assets(model: str) -> Path:
    args = [sys.executable, str(REPO / "scripts" / "assets.py")]
    if model == "gemma3":
        args.append("--gemma")
    paths = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    key = {"smollm2": "smollm2_hf", "gemma3": "gemma3_hf"}[model]
    return Path(paths[key])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--only", choices=["rtn", "gptq"], default=None)
    ap.add_argument("--clip", nargs="+", default=["none", "mse"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default="canterbury:plrabn12.txt")
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--keep", type=Path, default=None, help="Keep the artifacts in this folder.")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    src = assets(a.model)
    work = a.keep or Path(tempfile.mkdtemp(prefix="qtool-bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    qtool = [sys.executable, "-m", "qtool"]
    methods = [a.only] if a.only else ["rtn", "gptq"]
    rows: list[dict] = []
    for bits in a.bits:
        for method in methods:
            for clip in a.clip:
                name = f"{method}-w{bits}g{a.group_size}-{clip}"
                out = work / name
                shutil.rmtree(out, ignore_errors=True)
                cmd = qtool + [
                    "quantize", str(src), "--method", method, "--bits", str(bits),
                    "-g", str(a.group_size), "--clip", clip, "--format", "gptq",
                    "-o", str(out), "--json",
                ]  # fmt: skip
                if method == "gptq":
                    cmd += ["-d", "canterbury", "-n", str(a.samples), "-L", str(a.seq_len)]
                print(f"[{name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
                wall, rss, stdout, _ = run_captured(cmd)
                res = json.loads(stdout)
                row = {
                    "name": name,
                    "method": method,
                    "bits": bits,
                    "group_size": a.group_size,
                    "clip": clip,
                    "path": str(out),
                    "bytes": res.get("bytes"),
                    "quantize_wall_s": round(wall, 1),
                    "quantize_peak_rss_mib": round(rss / 2**20),
                }
                if method == "gptq":
                    layers = res["layers"]
                    row["gptq_better_than_rtn"] = f"{res['gptq_better_than_rtn']}/{len(layers)}"
                    row["calibration"] = f"canterbury {a.samples} x {a.seq_len}"
                print(f"[{name}] {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
                rows.append(row)

    cmd = qtool + ["eval", *[r["path"] for r in rows], "--base", str(src),
                   "--dataset", a.eval_text, "--ctx", str(a.eval_ctx),
                   "--chunks", str(a.eval_chunks), "--json"]  # fmt: skip
    print(f"[eval] {len(rows)} artifacts on {a.eval_text}", file=sys.stderr, flush=True)
    wall, rss, stdout, _ = run_captured(cmd)
    ev = json.loads(stdout)
    by_path = {r["source"]: r for r in ev["artifacts"]}
    for r in rows:
        e = by_path[r["path"]]
        r.update(
            ppl=e["ppl"],
            delta_ppl=e["delta_ppl"],
            kld_mean=e["kld"]["mean"],
            top1=e["top1"],
            bits_per_weight=e["bits_per_weight"],
        )
    report = {
        "model": a.model,
        "source": str(src),
        "eval": {
            "text": a.eval_text,
            "ctx": a.eval_ctx,
            "chunks": ev["settings"]["chunks"],
            "tokens_scored": ev["tokens"]["scored"],
            "seconds": round(wall, 1),
        },
        "fp_ppl": ev["base"]["ppl"],
        "rows": rows,
        "cpu": os.cpu_count(),
    }
    text = json.dumps(report, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    lines = [
        f"{a.model}: PPL on {a.eval_text} ({report['eval']['chunks']} x {a.eval_ctx} tokens); "
        f"FP {report['fp_ppl']:.3f}",
        "| config | PPL | ΔPPL | KLD | top-1 | bits/weight | quantize s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ppl']:.3f} | {r['delta_ppl']:+.3f} | {r['kld_mean']:.4f} | "
            f"{100 * r['top1']:.1f}% | {r['bits_per_weight']:.2f} | {r['quantize_wall_s']} | "
            f"{r['quantize_peak_rss_mib']} |"
        )
    print("\n".join(lines), file=sys.stderr)
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
