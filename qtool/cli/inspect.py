"""``qtool inspect``: architecture, parameters and the memory-footprint report, from headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qtool.cli.options import AllowPickle, JsonFlag, Revision, Source
from qtool.cli.options import output as sink
from qtool.io import atomic_file, check_writable
from qtool.output import jsonable


def inspect_cmd(
    src: Source,
    context: Annotated[
        int | None,
        typer.Option(
            "--context",
            min=1,
            help="Context length for the runtime estimate [default: model's, at most 4096].",
        ),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences in flight.")] = 1,
    cache_dtype: Annotated[
        str | None,
        typer.Option(
            "--cache-dtype", help="KV-cache dtype: bf16, fp16, fp32, fp8, q8_0 [default: model's]."
        ),
    ] = None,
    gpu_mem: Annotated[
        list[float] | None,
        typer.Option(
            "--gpu-mem",
            help="GPU size in GiB to count GPUs for (repeatable) [default: 24, 40, 80].",
        ),
    ] = None,
    lora_rank: Annotated[
        int, typer.Option("--lora-rank", min=1, help="LoRA rank for the training estimate.")
    ] = 16,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Also write the JSON report to this file (atomically)."
        ),
    ] = None,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    json_out: JsonFlag = False,
) -> None:
    """Architecture, parameters, dtypes and memory footprint, read from headers alone.

    Examples:

      qtool inspect meta-llama/Llama-3.1-8B --context 8192

      qtool inspect ./smollm2 --json | jq .formats
    """
    from qtool import api

    out = sink(json_out)
    if output is not None:
        check_writable(output)
    data: dict[str, Any] = api.inspect(
        src,
        context=context,
        batch=batch,
        cache_dtype=cache_dtype,
        gpu_mem=gpu_mem,
        lora_rank=lora_rank,
        revision=revision,
        allow_pickle=allow_pickle,
    ).data
    if not data["model"]["gguf_export_supported"]:
        out.warn(
            f"architecture {data['model']['model_type']!r} is not supported for export; "
            "GGUF sizes use llama's tensor names and may be approximate"
        )
    if output is not None:
        with atomic_file(output) as f:
            f.write(json.dumps(jsonable(data), indent=2).encode() + b"\n")
        out.info(f"wrote {output}")
    out.result(data, lambda console: render(console, data))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def render(console: Console, d: dict[str, Any]) -> None:
    m, p, rt, tr = d["model"], d["params"], d["runtime"], d["training"]
    head = Table(title=f"{m['source']}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("architecture", f"{m['architecture']} ({m['model_type']})"),
        ("layers", m["layers"]),
        ("hidden / intermediate", f"{m['hidden']} / {m['intermediate']}"),
        ("heads / kv heads / head dim", f"{m['heads']} / {m['kv_heads']} / {m['head_dim']}"),
        ("vocab", m["vocab"]),
        ("context length", m["context_length"]),
        ("sliding window", m["sliding_window"] or "-"),
        ("tied embeddings", "yes" if m["tied_embeddings"] else "no"),
        ("parameters", f"{p['total']:,} ({_count(p['total'])})"),
        ("by component", ", ".join(f"{k} {_count(v)}" for k, v in p["by_component"].items())),
        ("by dtype", ", ".join(f"{k} {_count(v)}" for k, v in p["by_dtype"].items())),
        ("on disk", f"{_size(m['bytes_on_disk'])} ({m['format']})"),
    ]
    if moe := p.get("moe"):
        rows.insert(
            9,
            (
                "active / token",
                f"{moe['active']:,} ({_count(moe['active'])}): {moe['top_k']} of "
                f"{moe['n_expert']} experts routed; experts {_count(moe['experts'])}; "
                f"{_count(moe['active_excl_embedding'])} without the token embeddings",
            ),
        )
    for k, v in rows:
        head.add_row(k, str(v))
    console.print(head)

    gpus = [str(int(g)) if float(g).is_integer() else str(g) for g in rt["gpu_sizes_gib"]]
    t = Table(
        title=f"Memory footprint: context {rt['context']}, batch {rt['batch']}, "
        f"KV cache {_size(rt['kv_cache'])} ({rt['cache_dtype']}), "
        f"activations {_size(rt['activations'])}",
        title_justify="left",
    )
    t.add_column("format")
    t.add_column("weights", justify="right")
    t.add_column("bits/weight", justify="right")
    moe = bool(p.get("moe"))
    if moe:
        t.add_column("of which experts", justify="right")
    t.add_column("inference total", justify="right")
    for g in gpus:
        t.add_column(f"{g} GiB GPUs", justify="right")
    for f, r in zip(d["formats"], rt["rows"], strict=True):
        t.add_row(
            f["format"],
            _size(f["bytes"]),
            f"{f['bits_per_weight']:.3f}",
            *([_size(f["expert_bytes"])] if moe else []),
            _size(r["total"]),
            *[str(r["gpus"][k]) for k in r["gpus"]],
        )
    console.print(t)

    tt = Table(
        title="Training (AdamW mixed precision, activation checkpointing)", title_justify="left"
    )
    tt.add_column("method")
    tt.add_column("memory", justify="right")
    for g in gpus:
        tt.add_column(f"{g} GiB GPUs", justify="right")
    for key, label in (("full_finetune", "full fine-tune"), ("lora", f"LoRA r={tr['lora_rank']}")):
        row = tr[key]
        tt.add_row(label, _size(row["bytes"]), *[str(v) for v in row["gpus"].values()])
    console.print(tt)
    console.print(
        "[dim]GGUF sizes follow llama-quantize's per-tensor types (fallbacks included); "
        "GPTQ counts qweight, qzeros, scales and g_idx. GPU counts keep 1 GiB free per GPU.[/dim]"
    )
