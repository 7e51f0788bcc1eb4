#!/usr/bin/env python3
"""qtool's importance matrix against llama.cpp's ``llama-imatrix``, on the same token chunks.

1. SmolLM2's HF asset -> F32 GGUF with llama.cpp's convert_hf_to_gguf.py (same weights);
2. the text is tokenized by qtool's (HF) tokenizer and by llama.cpp's (llama-cpp-python,
   vocab only); llama-imatrix takes the first ``--chunks`` chunks of ``--ctx`` tokens of the
   file (BOS replaces each chunk's first token when the vocab adds one), and qtool runs on
   exactly those token ids (llama.cpp's, should the tokenizations differ);
3. llama-imatrix -m f32.gguf -f TEXT -c CTX -b CTX --chunks K --no-ppl -ctk f32 -ctv f32
   -fa off (flash attention's CPU kernel adds ~2e-4 on attention outputs: ``--flash-attn``);
4. qtool's layer-by-layer float32 statistics on the same chunks;
5. per tensor: counts, relative L2 difference ||q - r|| / ||r|| of the Σx² vectors, and the
   largest per-channel relative difference (channels above 1e-6 of the tensor's max).

Prints a summary on stdout and writes every tensor's figures as JSON (``--out``). Exit 1 when
the worst relative L2 difference exceeds ``--tol``.

    .venv/bin/python scripts/check_imatrix.py --chunks 8 --ctx 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import WORK, assets, f32_gguf, llama_bin, llama_tokens, log, run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, help="text file [default: canterbury/alice29.txt]")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-5, help="max relative L2 difference")
    ap.add_argument(
        "--flash-attn",
        default="off",
        choices=["on", "off", "auto"],
        help="llama.cpp's flash attention (-fa); its CPU kernel is the larger source of "
        "difference (auto, the default there, moves attn_output inputs by ~2e-4)",
    )
    ap.add_argument(
        "--kv-cache",
        default="f32",
        help="llama.cpp's KV-cache type (-ctk/-ctv; f16 and f32 gave identical imatrices for "
        "SmolLM2 at 8 x 256)",
    )
    ap.add_argument("--out", type=Path, default=WORK / "check_imatrix.json")
    args = ap.parse_args()

    from qtool.calibrate.datasets import load_tokenizer
    from qtool.calibrate.imatrix import entries_from_stats, load_imatrix
    from qtool.checkpoint import open_checkpoint
    from qtool.runner.layers import calibrate_layerwise

    a = assets()
    hf = Path(a["smollm2_hf"])
    text_path = args.text or Path(a["canterbury"]) / "alice29.txt"
    text = text_path.read_text()
    bindir = llama_bin("llama-imatrix")
    gguf = f32_gguf(hf)
    WORK.mkdir(parents=True, exist_ok=True)

    n = args.chunks * args.ctx
    hf_ids = load_tokenizer(hf)(text, add_special_tokens=False)["input_ids"]
    ll_ids, bos = llama_tokens(gguf, text)
    same = hf_ids[:n] == ll_ids[:n]
    log(f"tokenizations of the first {n} tokens agree: {same}")
    ids = torch.tensor(ll_ids[:n], dtype=torch.long).view(args.chunks, args.ctx)
    if bos is not None:
        ids[:, 0] = bos

    ref_path = WORK / (
        f"llama-imatrix-{args.chunks}x{args.ctx}-kv{args.kv_cache}-fa{args.flash_attn}.gguf"
    )
    run(
        [
            bindir / "llama-imatrix",
            "-m", gguf, "-f", text_path, "-o", ref_path,
            "-c", args.ctx, "-b", args.ctx, "--chunks", args.chunks,
            "--no-ppl", "-t", args.threads, "-ctk", args.kv_cache, "-ctv", args.kv_cache,
            "-fa", args.flash_attn,
        ],
        log_to=WORK / "llama-imatrix.log",
    )  # fmt: skip
    ref = load_imatrix(ref_path)

    torch.set_num_threads(args.threads)
    ckpt = open_checkpoint(str(hf))
    res = calibrate_layerwise(ckpt, ids, batch_size=1, device=torch.device("cpu"))
    mine = entries_from_stats(res.stats.values(), model_type=ckpt.config["model_type"], n_layers=30)

    rows = []
    for name in sorted(ref.entries):
        r, q = ref.entries[name], mine.get(name)
        if q is None:
            rows.append({"tensor": name, "missing_in_qtool": True})
            continue
        rs, qs = r.sums.reshape(-1).astype(np.float64), q.sums.reshape(-1).astype(np.float64)
        keep = rs > 1e-6 * rs.max()
        rows.append(
            {
                "tensor": name,
                "count_llama": float(r.counts[0]),
                "count_qtool": float(q.counts[0]),
                "rel_l2": float(np.linalg.norm(qs - rs) / np.linalg.norm(rs)),
                "max_rel": float(np.max(np.abs(qs[keep] - rs[keep]) / rs[keep])),
            }
        )
    extra = sorted(set(mine) - set(ref.entries))
    ok = [x for x in rows if "rel_l2" in x]
    worst = max(ok, key=lambda x: x["rel_l2"])
    summary = {
        "model": str(hf),
        "text": str(text_path),
        "chunks": args.chunks,
        "ctx": args.ctx,
        "tokenizations_agree": same,
        "llama_kv_cache": args.kv_cache,
        "llama_flash_attn": args.flash_attn,
        "tensors_compared": len(ok),
        "missing_in_qtool": [x["tensor"] for x in rows if "missing_in_qtool" in x],
        "only_in_qtool": extra,
        "counts_equal": all(x["count_llama"] == x["count_qtool"] for x in ok),
        "rel_l2_median": float(np.median([x["rel_l2"] for x in ok])),
        "rel_l2_max": worst["rel_l2"],
        "rel_l2_worst_tensor": worst["tensor"],
        "max_rel_max": max(x["max_rel"] for x in ok),
        "qtool_seconds": round(res.seconds, 1),
    }
    args.out.write_text(json.dumps({"summary": summary, "tensors": rows}, indent=1))
    kinds: dict[str, list[float]] = {}
    for x in ok:
        kinds.setdefault(x["tensor"].split(".", 2)[2], []).append(x["rel_l2"])
    print(json.dumps(summary, indent=1))
    print("\nrelative L2 difference per weight kind over the 30 layers (min / median / max):")
    for k, v in sorted(kinds.items()):
        print(f"  {k:22s} {min(v):.2e} / {np.median(v):.2e} / {max(v):.2e}")
    print(f"\nper-tensor figures: {args.out}")
    fine = summary["counts_equal"] and not summary["missing_in_qtool"]
    return 0 if fine and summary["rel_l2_max"] <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
