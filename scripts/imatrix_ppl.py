#!/usr/bin/env python3
"""Does qtool's imatrix help llama-quantize? Perplexity with and without it.

1. SmolLM2's HF asset -> F32 GGUF with llama.cpp's convert_hf_to_gguf.py;
2. ``qtool calibrate`` on the ``canterbury`` set (alice29, asyoulik, lcet10) -> imatrix GGUF;
3. ``llama-quantize`` to each type (default Q3_K_M and Q2_K) with and without ``--imatrix``;
4. ``llama-perplexity`` on plrabn12.txt (Paradise Lost: a Canterbury text not used for
   calibration), ``--chunks`` chunks of ``--ctx`` tokens, for each quantized model and F32.

Prints a table on stdout and writes JSON (``--out``). Exit 1 unless every type has a lower
perplexity with the imatrix than without.

    .venv/bin/python scripts/imatrix_ppl.py --samples 32 --seq-len 512 --chunks 24
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import WORK, assets, f32_gguf, llama_bin, log, perplexity, run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=["Q3_K_M", "Q2_K"])
    ap.add_argument("--samples", type=int, default=32, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration sample length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=512, help="perplexity context")
    ap.add_argument("--chunks", type=int, default=24, help="perplexity chunks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=WORK / "imatrix_ppl.json")
    args = ap.parse_args()

    a = assets()
    hf = Path(a["smollm2_hf"])
    eval_text = Path(a["canterbury"]) / "plrabn12.txt"
    bindir = llama_bin()
    gguf = f32_gguf(hf)
    WORK.mkdir(parents=True, exist_ok=True)

    tag = f"canterbury-{args.samples}x{args.seq_len}-s{args.seed}"
    stats = WORK / f"smollm2.{tag}.calib.safetensors"
    imatrix = WORK / f"smollm2.{tag}.imatrix.gguf"
    if not imatrix.exists():
        log(f"qtool calibrate -> {imatrix}")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(
            [
                sys.executable, "-m", "qtool", "calibrate", str(hf),
                "-d", "canterbury", "-n", str(args.samples), "-L", str(args.seq_len),
                "--seed", str(args.seed), "--device", "cpu",
                "-o", str(stats), "--imatrix", str(imatrix), "--json",
            ],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    def ppl(model: Path) -> tuple[float, float]:
        out = run(
            [
                bindir / "llama-perplexity", "-m", model, "-f", eval_text,
                "-c", args.ctx, "--chunks", args.chunks, "-t", args.threads,
                # --no-repack: no extra buffer types. With GGML_NATIVE on a CPU reporting
                # AMX-INT8, the AMX mul_mat crashed (SIGSEGV in ggml_backend_amx_mul_mat) on
                # Q3_K_M/Q2_K models here; the plain CPU kernels run instead.
                "--no-repack",
            ],
            log_to=model.with_suffix(".ppl.log"),
        )  # fmt: skip
        return perplexity(out)

    results: dict[str, dict[str, float]] = {
        "F32": dict(zip(("ppl", "err"), ppl(gguf), strict=True))
    }
    for qtype in args.types:
        for with_im in (False, True):
            label = f"{qtype}{' +imatrix' if with_im else ''}"
            out = WORK / f"smollm2-{qtype}{'-imatrix-' + tag if with_im else ''}.gguf"
            cmd = [bindir / "llama-quantize"]
            if with_im:
                cmd += ["--imatrix", imatrix]
            log_text = run(
                [*cmd, gguf, out, qtype, args.threads], log_to=out.with_suffix(".quantize.log")
            )
            if with_im and "loaded" not in log_text:
                raise SystemExit(f"llama-quantize did not load {imatrix}:\n{log_text[-2000:]}")
            p, e = ppl(out)
            results[label] = {"ppl": p, "err": e, "bytes": out.stat().st_size}
            log(f"{label}: PPL {p:.4f} +/- {e:.4f}")

    print(
        f"perplexity on {eval_text.name}, {args.chunks} chunks x {args.ctx} tokens "
        f"(imatrix: qtool calibrate -d canterbury -n {args.samples} -L {args.seq_len})"
    )
    print(f"{'model':18s} {'PPL':>10s} {'+/-':>8s}")
    for k, v in results.items():
        print(f"{k:18s} {v['ppl']:10.4f} {v['err']:8.4f}")
    better = {q: results[f"{q} +imatrix"]["ppl"] < results[q]["ppl"] for q in args.types}
    args.out.write_text(
        json.dumps(
            {"results": results, "imatrix_better": better, "args": vars(args)},
            indent=1,
            default=str,
        )
    )
    print(f"imatrix lowers perplexity: {better}")
    return 0 if all(better.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
