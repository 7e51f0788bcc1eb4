#!/usr/bin/env python3
"""The compute floor of a GPTQ run on this machine, and how close qtool's run comes to it.

Whatever a GPTQ implementation does around them, two sets of matrix products are the work
itself: one forward of every decoder layer over every calibration token (the layer's next
input), and, for every distinct linear input, the sum ``X^T X`` over those tokens (the
Hessian; symmetric, so its upper blocks only, by :class:`qtool.observers.stats.
HessianAccumulator`'s own block rule). Their time on this machine, in the compute dtype, bounds
any exact GPTQ run from below; the rest of a run (solves, folds, reading, writing, imports) is
overhead above it.

This script takes the model's own decoder layer (its weights, its attention, norms and rotary
embeddings, through qtool's layer runner on a few batches of random token ids: the products'
time does not depend on the tokens), times one forward of layer 0 per batch and the Hessian
products of each input group at the accumulator's row count, and multiplies out to the run's
samples and layers. ``--run`` then times ``qtool quantize --method gptq`` itself in a fresh
process on the same settings (calibration on ``canterbury``) and reports floor / wall. Dense
models: a mixture of experts' layer would be timed with its router's choices, not the every-expert
passes its GPTQ runs.

    python scripts/bench_floor.py --run --out bench-floor-smollm2.json      # SmolLM2, 128 x 512

JSON on stdout (and ``--out``), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import assets  # noqa: E402
from measure import best_time, run_captured  # noqa: E402

TIMED_BATCHES = 8  # batches the layer forward is timed over (the embedding pass runs on these)


def log(msg: str) -> None:
    print(f"[bench_floor] {msg}", file=sys.stderr, flush=True)


def _best(fn: Any, device: Any, reps: int) -> float:
    """Best of ``reps`` timed calls of ``fn`` (a GPU's work waited for) after one warm-up call."""
    import torch

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    return best_time(call, reps)


def measure_floor(
    src: str,
    samples: int,
    seq_len: int,
    batch_size: int,
    device_name: str,
    dtype_name: str,
    reps: int,
) -> dict[str, Any]:
    import torch
    from torch import nn

    from qtool.checkpoint import open_checkpoint
    from qtool.observers.stats import HessianAccumulator
    from qtool.runner.layers import Session, pick_device, resolve_dtype
    from qtool.runner.layers import dtype_name as name_of
    from qtool.runner.sequential import discover

    device = pick_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    ckpt = open_checkpoint(src)
    vocab = int(ckpt.config.get("vocab_size") or 32000)
    gen = torch.Generator().manual_seed(0)
    timed = max(1, min(samples, TIMED_BATCHES * batch_size) // batch_size)  # batches
    ids = torch.randint(0, vocab, (timed * batch_size, seq_len), generator=gen)
    session = Session(ckpt, ids, device=device, dtype=dtype, batch_size=batch_size)
    try:
        session.embed(session.n_layers + 1)
        args = session.args(0)
        with session.loaded(0) as layer:
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}

            def once() -> Any:
                a, k = args[0]
                return layer(session.hidden[0], *a, **k)

            plan = discover(layer, linears, once)

            def forward_all() -> None:
                with torch.no_grad():
                    for j in range(timed):
                        a, k = args[j]
                        layer(session.hidden[j], *a, **k)

            per_batch = _best(forward_all, device, reps) / timed
        groups: list[dict[str, Any]] = []
        rows = HessianAccumulator.BUFFER_ROWS
        for g in plan.groups:
            cols = linears[g[0]].in_features
            acc = HessianAccumulator(cols, device)
            x = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
            t = _best(lambda acc=acc, x=x: acc.add(x), device, reps)  # rows >= buffer: one product
            groups.append({"linears": g, "columns": cols, "seconds_per_rows": t})
    finally:
        session.close()
    tokens = samples * seq_len
    layers = session.n_layers
    forward_s = per_batch * samples / batch_size * layers
    hessian_s = sum(g["seconds_per_rows"] for g in groups) * tokens / rows * layers
    return {
        "model": src,
        "device": str(device),
        "compute_dtype": name_of(dtype),
        "layers": layers,
        "samples": samples,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "layer_forward_ms_per_batch": round(per_batch * 1e3, 3),
        "hessian_groups": [
            {**g, "seconds_per_rows": round(g["seconds_per_rows"], 6), "rows": rows} for g in groups
        ],
        "forward_s": round(forward_s, 2),
        "hessian_s": round(hessian_s, 2),
        "floor_s": round(forward_s + hessian_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M's asset)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1, help="samples per forward (qtool's)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compute-dtype", default="auto")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (the best counts)")
    ap.add_argument("--run", action="store_true", help="also time qtool's GPTQ run itself")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    src = args.model or str(assets()["smollm2_hf"])
    log(f"floor of {args.samples} x {args.seq_len} tokens on {src} ...")
    floor = measure_floor(
        src,
        args.samples,
        args.seq_len,
        args.batch_size,
        args.device,
        args.compute_dtype,
        args.reps,
    )
    log(
        f"  forwards {floor['forward_s']} s + Hessian products {floor['hessian_s']} s "
        f"= {floor['floor_s']} s ({floor['compute_dtype']} on {floor['device']})"
    )
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "platform": platform.platform(),
        },
        "floor": floor,
    }
    if args.run:
        env = dict(os.environ)
        env.pop("QTOOL_NPROC", None)
        with tempfile.TemporaryDirectory(prefix="qtool-bench-floor-") as tmp:
            cmd = [
                sys.executable, "-m", "qtool", "quantize", src,
                "--method", "gptq", "--bits", str(args.bits), "-g", str(args.group_size),
                "-d", "canterbury", "-n", str(args.samples), "-L", str(args.seq_len),
                "--batch-size", str(args.batch_size), "--device", args.device,
                "--compute-dtype", floor["compute_dtype"],
                "-o", str(Path(tmp) / "out"), "--json",
            ]  # fmt: skip
            log("qtool quantize --method gptq ...")
            wall, peak, stdout, _ = run_captured(cmd, env)
            result = json.loads(stdout)
        runner_s = float(result.get("gptq", {}).get("seconds") or 0.0)
        report["run"] = {
            "command": cmd[1:],
            "wall_s": round(wall, 2),
            "runner_s": round(runner_s, 2),
            "peak_rss_bytes": peak,
            "floor_over_wall": round(floor["floor_s"] / wall, 3),
        }
        log(f"  {wall:.1f} s wall ({runner_s:.1f} s in the runner): floor / wall "
            f"{report['run']['floor_over_wall']}")  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
