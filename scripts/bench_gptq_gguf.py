"""GPTQ on llama.cpp's grids against llama.cpp's own presets made with the same importance matrix.

For each preset: llama.cpp quantizes qtool's F32 GGUF of the model with an imatrix of the
calibration tokens (``llama_model_quantize``, i.e. llama-quantize); qtool runs GPTQ with the same
preset's types on the same tokens (``--imatrix calibration`` for the RTN'd tensors). One
``qtool eval`` scores every file against the F32 model on a text the calibration never saw
(Paradise Lost; the ``canterbury`` set leaves it out): PPL, KLD, top-1, bytes, and the time.

    python scripts/bench_gptq_gguf.py --out bench-gptq-gguf.json          # SmolLM2, 4 presets
    python scripts/bench_gptq_gguf.py --quick                             # 16 x 256 tokens

JSON on stdout (and ``--out``), a markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def qtool(*args: str) -> dict:
    cmd = [sys.executable, "-m", "qtool", "--json", *map(str, args)]
    log(" ".join(cmd[2:]))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"qtool failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder [SmolLM2 asset]")
    ap.add_argument("--presets", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q4_0", "Q6_K"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=20)
    ap.add_argument(
        "--natural-order",
        action="store_true",
        help="GPTQ without act-order (the default is act-order with static groups)",
    )
    ap.add_argument("--quick", action="store_true", help="16 x 256 calibration, 8 eval windows")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qtool/bench-gptq-gguf")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        a.samples, a.seq_len, a.eval_chunks = 16, 256, 8

    from qtool.calibrate.imatrix import read_imatrix
    from tests.export.helpers import llama_quantize

    model = (
        a.model
        or subprocess.run(
            [sys.executable, str(REPO / "scripts/assets.py"), "--path", "smollm2_hf"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "model-f32.gguf"
    if not f32.exists():
        qtool("export", model, "--outtype", "F32", "-o", f32)
    calib = ["-d", "canterbury", "-n", str(a.samples), "-L", str(a.seq_len)]
    imat = work / f"imatrix-{a.samples}x{a.seq_len}.gguf"
    t0 = time.perf_counter()
    qtool("calibrate", model, *calib, "-o", work / "calib.safetensors", "--imatrix", imat)
    calib_s = time.perf_counter() - t0
    rows = []
    artifacts = []
    for preset in a.presets:
        ref = work / f"llamacpp-{preset}-imatrix.gguf"
        t0 = time.perf_counter()
        llama_quantize(f32, ref, preset, imatrix=read_imatrix(imat))
        ref_s = time.perf_counter() - t0
        mine = work / f"qtool-gptq-{preset}.gguf"
        extra = ["--no-act-order"] if a.natural_order else []
        t0 = time.perf_counter()
        res = qtool("quantize", model, "--method", "gptq", "--type", preset, *calib,
                    "--imatrix", "calibration", *extra, "-o", mine)  # fmt: skip
        gptq_s = time.perf_counter() - t0
        rows.append(
            {
                "preset": preset,
                "llamacpp": {"path": str(ref), "bytes": ref.stat().st_size, "seconds": ref_s},
                "gptq": {
                    "path": str(mine),
                    "bytes": mine.stat().st_size,
                    "seconds": gptq_s,
                    "linears_better_than_rtn": res.get("gptq_better_than_rtn"),
                    "linears": len(res.get("layers", [])),
                },
            }
        )
        artifacts += [ref, mine]
    ev = qtool("eval", *artifacts, "--base", f32, "--dataset", "canterbury:plrabn12.txt",
               "--ctx", a.eval_ctx, "--chunks", a.eval_chunks)  # fmt: skip
    by_path = {x["source"]: x for x in ev["artifacts"]}
    for r in rows:
        for k in ("llamacpp", "gptq"):
            e = by_path[r[k]["path"]]
            r[k].update(
                ppl=e["ppl"],
                kld=e["kld"]["mean"],
                top1=e["top1"],
                bits_per_weight=e.get("bits_per_weight"),
            )
        r["kld_ratio_gptq_over_llamacpp"] = r["gptq"]["kld"] / r["llamacpp"]["kld"]
    out = {
        "model": model,
        "calibration": {"dataset": "canterbury", "samples": a.samples, "seq_len": a.seq_len},
        "calibrate_seconds": calib_s,
        "eval": {
            "dataset": "canterbury:plrabn12.txt",
            "ctx": a.eval_ctx,
            "chunks": a.eval_chunks,
            "base_ppl": ev["base"]["ppl"],
        },  # fmt: skip
        "act_order": not a.natural_order,
        "rows": rows,
    }
    print(f"base PPL {ev['base']['ppl']:.3f}", file=sys.stderr)
    print("| preset | file | bytes | PPL | KLD | top-1 | s |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        for k, label in (("llamacpp", "llama.cpp + imatrix"), ("gptq", "qtool GPTQ")):
            x = r[k]
            print(f"| {r['preset']} | {label} | {x['bytes']:,} | {x['ppl']:.3f} | {x['kld']:.4f} "
                  f"| {100 * x['top1']:.1f}% | {x['seconds']:.0f} |", file=sys.stderr)  # fmt: skip
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
