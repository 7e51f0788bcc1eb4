#!/usr/bin/env python3
"""Benchmark ``qtool eval`` against llama-cpp-python on the same GGUF, text and windows.

Three timed passes in one run, JSON on stdout (progress on stderr):

- ``qtool_eval``: ``qtool eval GGUF --base HF`` as the CLI runs it (the GGUF decoded exactly by
  the codecs into the HF architecture, torch forward, the base model beside it, metrics);
  reported end to end and per model (the artifact's forward alone is what compares with
  llama.cpp);
- ``qtool_eval_llama_backend``: the same with ``--backend llama.cpp``;
- ``llama_cpp_python``: llama-cpp-python alone evaluating the same windows with every
  position's logits (``logits_all``), as llama-perplexity needs them.

Tokens per second count the tokens of the text run through a model (windows x ctx).

    .venv/bin/python scripts/bench_eval.py [--model smollm2|gemma3] [--ctx 256] [--chunks 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[bench_eval] {msg}", file=sys.stderr, flush=True)


def assets(gemma: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "scripts" / "assets.py")] + (["--gemma"] if gemma else [])
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def qtool_pass(gguf: str, base: str, args: argparse.Namespace, backend: str) -> dict[str, Any]:
    from qtool.evaluate import EvalSettings, run_eval

    t = time.perf_counter()
    d = run_eval(
        EvalSettings(
            artifacts=[gguf],
            base=base,
            dataset=args.dataset,
            ctx=args.ctx,
            chunks=args.chunks,
            backend=backend,
            threads=args.threads,
            device="cpu",
        )
    )
    wall = time.perf_counter() - t
    a, b = d["artifacts"][0], d["base"]
    return {
        "tokens_per_second": d["timing"]["tokens_per_second"],
        "artifact_forward_tokens_per_second": a["tokens_per_second"],
        "base_forward_tokens_per_second": b["tokens_per_second"],
        "eval_seconds": d["timing"]["eval_seconds"],
        "load_seconds": d["timing"]["load_seconds"],
        "wall_seconds": wall,
        "ppl": a["ppl"],
        "base_ppl": b["ppl"],
        "kld_mean": a["kld"]["mean"],
        "top1": a["top1"],
        "tokens": d["tokens"]["evaluated"],
    }


def llama_pass(gguf: str, base: str, args: argparse.Namespace) -> dict[str, Any]:
    from qtool.checkpoint import open_checkpoint
    from qtool.evaluate.data import adds_bos, make_windows, resolve_dataset, tokenize
    from qtool.evaluate.llamacpp import open_llama
    from qtool.evaluate.loaders import load_tokenizer

    tok = load_tokenizer(open_checkpoint(base))
    ids = tokenize(tok, resolve_dataset(args.dataset).text)
    windows, _ = make_windows(
        ids, args.ctx, args.chunks, tok.bos_token_id if adds_bos(tok) else None
    )
    t = time.perf_counter()
    llm = open_llama(gguf, args.ctx, args.threads)
    load = time.perf_counter() - t
    nll, seconds = [], 0.0
    for w in windows:
        t = time.perf_counter()
        llm.reset()
        llm.eval([int(x) for x in w])
        scores = np.array(llm.scores[: len(w)], dtype=np.float64)  # the copy is part of the cost
        seconds += time.perf_counter() - t
        z = scores[:-1] - scores[:-1].max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(len(w) - 1), w[1:]])
    llm.close()
    n = windows.size
    return {
        "tokens_per_second": n / seconds,
        "eval_seconds": seconds,
        "load_seconds": load,
        "ppl": math.exp(float(np.concatenate(nll).mean())),
        "tokens": int(n),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--dataset", default="canterbury:plrabn12.txt")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    args = p.parse_args()
    import torch

    from qtool.output import Output, set_output

    set_output(Output(verbosity=-1))
    a = assets(args.model == "gemma3")
    gguf, base = a[f"{args.model}_gguf"], a[f"{args.model}_hf"]
    if not gguf or not base:
        sys.exit(f"{args.model} assets missing: run `make assets-gemma`")
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    log(f"{args.model}: qtool eval (torch, decoded GGUF)")
    q = qtool_pass(gguf, base, args, "torch")
    log(f"{args.model}: qtool eval --backend llama.cpp")
    ql = qtool_pass(gguf, base, args, "llama.cpp")
    log(f"{args.model}: llama-cpp-python alone")
    ll = llama_pass(gguf, base, args)
    out = {
        "benchmark": "qtool eval vs llama-cpp-python",
        "model": Path(gguf).name,
        "base": Path(base).name,
        "dataset": args.dataset,
        "ctx": args.ctx,
        "windows": args.chunks,
        "threads": args.threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },  # fmt: skip
        "qtool_eval": q,
        "qtool_eval_llama_backend": ql,
        "llama_cpp_python": ll,
        "ratio_artifact_forward_vs_llama_cpp": q["artifact_forward_tokens_per_second"]
        / ll["tokens_per_second"],
        "ppl_relative_difference_decoded_vs_llama_cpp": q["ppl"] / ll["ppl"] - 1,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
