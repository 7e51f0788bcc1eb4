#!/usr/bin/env python3
"""GPTQ time per decoder layer and peak memory at real model widths, extrapolated to full depth.

A full 8B model does not fit this benchmark's budget (nor a CI machine), but a GPTQ run is a
fixed part (load, tokenize, embeddings, head, writing) plus one cost per decoder layer, each
layer being the same shapes. So for each shape this script builds two random checkpoints with
the *real* widths (hidden, intermediate, heads, KV heads, vocabulary, rope scaling from the
published configs) and ``--layers`` decoder layers (default 1 and 3), runs ``qtool quantize
--method gptq`` on each in a fresh process (wall time and its own peak RSS,
``scripts/measure.py``; qtool's own peak host/device figures from its ``--json``) and solves

    T(L) = fixed + per_layer * L       RSS(L) = rss_fixed + rss_per_layer * L

from the two runs, then extrapolates to the published depth. ``rss_per_layer`` near zero is the
claim being checked: weights are onloaded one layer at a time and the hidden-state cache does
not grow with depth.

The tokenizer is SmolLM2's (its ids are all below the vocabularies used here); only the
embedding and head widths depend on the real vocabulary, which is kept. Token counts are
``--samples x --seq-len``; on a CPU keep them small (time per layer grows linearly with tokens
for the forwards, the GPTQ solves do not depend on them), on a GPU use the real recipe
(128 x 2048).

    python scripts/bench_scale.py --out bench-scale.json                  # CPU, 1B and 8B
    python scripts/bench_scale.py --shape 8b --samples 128 --seq-len 2048 --device cuda

JSON on stdout (and ``--out``), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import assets  # noqa: E402
from measure import run_captured  # noqa: E402

# The published configs' numbers (meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B).
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {
        "name": "Llama-3.2-1B",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "num_hidden_layers": 16,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
    },
    "8b": {
        "name": "Llama-3.1-8B",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "num_hidden_layers": 32,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
    },
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def log(msg: str) -> None:
    print(f"[bench_scale] {msg}", file=sys.stderr, flush=True)


def build_checkpoint(folder: Path, shape: dict[str, Any], layers: int, tok_src: Path) -> int:
    """A random bf16 Llama checkpoint with ``shape``'s widths and ``layers`` layers; returns
    its size in bytes. One shard (the embeddings, a layer, the head) is made and written at a
    time."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = {k: v for k, v in shape.items() if k != "name"}
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        num_hidden_layers=layers,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (tok_src / name).exists():
            shutil.copy(tok_src / name, folder / name)

    h, ff, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = shape["head_dim"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(0)

    def rand(*dims: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen) * std).to(torch.bfloat16)

    def shard(n: int) -> dict[str, torch.Tensor]:  # 0: embeddings, 1..layers, then the head
        if n == 0:
            return {"model.embed_tokens.weight": rand(v, h)}
        if n <= layers:
            p = f"model.layers.{n - 1}."
            return {
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": rand(q, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, q),
                p + "mlp.gate_proj.weight": rand(ff, h),
                p + "mlp.up_proj.weight": rand(ff, h),
                p + "mlp.down_proj.weight": rand(h, ff),
            }
        last = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        if not shape["tie_word_embeddings"]:
            last["lm_head.weight"] = rand(v, h)
        return last

    index: dict[str, str] = {}
    total = 0
    count = layers + 2
    for n in range(count):  # one shard in memory at a time
        tensors = shard(n)
        fname = f"model-{n + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        for k, t in tensors.items():
            index[k] = fname
            total += t.numel() * t.element_size()
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )
    return total


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (layers, value): (fixed, per_layer)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    ap.add_argument("--layers", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compute-dtype", default="auto")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints here (default: temp)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if len(set(args.layers)) < 2:
        raise SystemExit("--layers needs at least two different depths to separate the costs")

    tok = Path(assets()["smollm2_hf"])
    work = args.work or Path(tempfile.mkdtemp(prefix="qtool-bench-scale-"))
    env = dict(os.environ)
    env.pop("QTOOL_NPROC", None)
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "platform": platform.platform(),
        },
        "settings": {
            k: getattr(args, k.replace("-", "_"))
            for k in ("samples", "seq-len", "bits", "group-size", "device", "compute-dtype")
        },
        "shapes": {},
    }
    try:
        for key in args.shape:
            shape = SHAPES[key]
            runs = []
            for layers in sorted(set(args.layers)):
                ckpt = work / f"{key}-{layers}L"
                out = work / f"{key}-{layers}L-gptq"
                shutil.rmtree(ckpt, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
                size = build_checkpoint(ckpt, shape, layers, tok)
                cmd = [
                    sys.executable, "-m", "qtool", "quantize", str(ckpt),
                    "--method", "gptq", "--bits", str(args.bits), "-g", str(args.group_size),
                    "-d", "canterbury", "-n", str(args.samples), "-L", str(args.seq_len),
                    "--device", args.device, "--compute-dtype", args.compute_dtype,
                    "--format", "gptq", "-o", str(out), "--json",
                ]  # fmt: skip
                log(f"{shape['name']} x {layers} layers ({size / 2**30:.2f} GiB): GPTQ ...")
                wall, rss, stdout, _ = run_captured(cmd, env)
                compute = json.loads(stdout).get("gptq", {})
                runs.append(
                    {
                        "layers": layers,
                        "checkpoint_bytes": size,
                        "wall_s": round(wall, 2),
                        "peak_rss_bytes": rss,
                        "qtool_compute": compute,
                    }
                )
                log(f"  {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB, {compute}")
                shutil.rmtree(ckpt, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
            t_fixed, t_layer = fit([(r["layers"], r["wall_s"]) for r in runs])
            m_fixed, m_layer = fit([(r["layers"], r["peak_rss_bytes"]) for r in runs])
            depth = shape["num_hidden_layers"]
            dev = [(r["layers"], r["qtool_compute"].get("peak_device_bytes") or 0) for r in runs]
            entry: dict[str, Any] = {
                "name": shape["name"],
                "runs": runs,
                "seconds_fixed": round(t_fixed, 2),
                "seconds_per_layer": round(t_layer, 2),
                "full_depth_layers": depth,
                "full_depth_seconds": round(t_fixed + t_layer * depth, 1),
                "peak_rss_per_layer_bytes": round(m_layer),
                "full_depth_peak_rss_bytes": round(m_fixed + m_layer * depth),
            }
            if any(b for _, b in dev):
                d_fixed, d_layer = fit(dev)
                entry["full_depth_peak_device_bytes"] = round(d_fixed + d_layer * depth)
            report["shapes"][key] = entry
            log(
                f"{shape['name']}: {t_layer:.1f} s per layer + {t_fixed:.1f} s fixed -> "
                f"{entry['full_depth_seconds']:.0f} s at {depth} layers; peak RSS "
                f"{entry['full_depth_peak_rss_bytes'] / 2**30:.2f} GiB "
                f"({m_layer / 2**20:+.0f} MiB per layer)"
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
