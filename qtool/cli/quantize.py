"""``qtool quantize``: flags (or ``--recipe``) -> a recipe -> :func:`qtool.api.quantize` -> report.

Every option that shapes the result is a recipe field (:data:`qtool.recipe.FLAGS`); options are
``None`` unless given, so one that does not apply to what the others ask for is refused by name
(:func:`qtool.recipe.from_options`) instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qtool.cli.options import (
    AllowPickle,
    ComputeDtype,
    JsonFlag,
    MaxGpuMemory,
    MaxMemory,
    Nproc,
    Revision,
    Source,
)
from qtool.cli.options import output as sink

Imatrix = Annotated[
    str | None,
    typer.Option(
        "--imatrix",
        help="Importance matrix for GGUF outputs (llama-imatrix GGUF or .dat), or `calibration` "
        "to compute it from --dataset.",
    ),
]
TensorType = Annotated[
    list[str] | None,
    typer.Option(
        "--tensor-type", help="PATTERN=TYPE override, regex on llama.cpp names (repeatable)."
    ),
]
OutputTensorType = Annotated[
    str | None, typer.Option("--output-tensor-type", help="Type for output.weight.")
]
TokenEmbeddingType = Annotated[
    str | None, typer.Option("--token-embedding-type", help="Type for token_embd.weight.")
]
Pure = Annotated[
    bool, typer.Option("--pure", help="One type for every tensor: no preset mix, no fallbacks.")
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the plan (every tensor: method, grid or type, bytes) from headers alone.",
    ),
]
TokenizerPre = Annotated[
    str | None,
    typer.Option("--tokenizer-pre", help="llama.cpp pre-tokenizer name, if it is not recognised."),
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Errors, not warnings: a pattern that matches no tensor; a GGUF whose tokenizer "
        "(llama.cpp's, from the file) splits the test strings unlike the source's.",
    ),
]


def quantize_cmd(
    src: Source,
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="A recipe (YAML/JSON): stages, calibration, outputs."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="rtn (round-to-nearest; kquant is its GGUF name), gptq, bitnet \\[default: rtn].",
        ),
    ] = None,
    qtype: Annotated[
        str | None,
        typer.Option(
            "--type", help="GGUF output: a type or llama-quantize preset (Q4_K_M, Q8_0, TQ2_0...)."
        ),
    ] = None,
    bits: Annotated[
        int | None, typer.Option("--bits", help="Integer outputs: 2 to 8; bitnet: 2 or 1.")
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size", "-g", help="Input columns per scale; -1: one per channel \\[128]."
        ),
    ] = None,
    granularity: Annotated[
        str | None,
        typer.Option("--granularity", help="tensor, channel or group \\[default: from -g]."),
    ] = None,
    asym: Annotated[
        bool | None,
        typer.Option("--asym/--sym", help="Zero-point (asymmetric) or absmax (symmetric)."),
    ] = None,
    restricted: Annotated[
        bool,
        typer.Option("--restricted", help="Symmetric grid ±(2^(b-1)-1), code 0 unused."),
    ] = False,
    clip: Annotated[
        str | None,
        typer.Option("--clip", help="Integer grids: none, percentile:P, mse, kl \\[none]."),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="gguf, gptq, compressed-tensors, mxfp4 (gpt-oss experts, transformers' layout); "
            "bitnet: gguf or safetensors \\[default: gguf with --type or a .gguf output; gptq "
            "for GPTQ at 2/3/4/8 bits; compressed-tensors].",
        ),
    ] = None,
    act_bits: Annotated[
        int | None, typer.Option("--act-bits", help="8: int8 activations too (W8A8).")
    ] = None,
    act_static: Annotated[
        bool,
        typer.Option("--act-static", help="W8A8: static per-tensor input scales (else per token)."),
    ] = False,
    smoothquant: Annotated[
        float | None,
        typer.Option("--smoothquant", help="SmoothQuant migration strength alpha (e.g. 0.5)."),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option("--stats", help="Activation statistics from `qtool calibrate`."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Calibration data (as qtool calibrate)."),
    ] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", "-n", help="Calibration samples \\[128].")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", "-L", help="Tokens per sample \\[512].")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Picks the calibration windows.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Calibration samples per forward \\[1]: faster on many cores, more memory "
            "(the memory plan counts it).",
        ),
    ] = None,
    damp: Annotated[
        float | None, typer.Option("--damp", help="GPTQ: dampening, fraction of mean diag(H).")
    ] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="GPTQ: columns per lazy update.")
    ] = None,
    act_order: Annotated[
        bool | None,
        typer.Option(
            "--act-order/--no-act-order",
            help="GPTQ: columns by decreasing Hessian diagonal (desc_act). Default: on.",
        ),
    ] = None,
    static_groups: Annotated[
        bool | None,
        typer.Option(
            "--static-groups/--no-static-groups",
            help="GPTQ: group scales fitted before the pass. Default: as --act-order.",
        ),
    ] = None,
    true_sequential: Annotated[
        bool | None,
        typer.Option(
            "--true-sequential/--no-true-sequential",
            help="GPTQ: each group of linears sees the earlier ones quantized.",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted run (killed, power loss, or Ctrl-C of a run given "
            "--resume) to the bytes an uninterrupted one writes: GPTQ's checkpoint folder "
            "(OUTPUT.qtool-gptq by default); without GPTQ, the OUT.qtool-partial folder a GGUF "
            "output left. GGUF outputs continue their partial files too.",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto (GPU if present), cpu, cuda:N.")
    ] = "auto",
    compute_dtype: ComputeDtype = None,
    max_memory: MaxMemory = None,
    max_gpu_memory: MaxGpuMemory = None,
    eval_dataset: Annotated[
        str | None,
        typer.Option(
            "--eval-dataset",
            help="Measure PPL/KLD/top-1 vs the base on this text for the model card "
            "(e.g. canterbury:plrabn12.txt).",
        ),
    ] = None,
    eval_ctx: Annotated[int, typer.Option("--eval-ctx", help="Eval window.")] = 256,
    eval_chunks: Annotated[int, typer.Option("--eval-chunks", help="Eval windows.")] = 8,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output: a .gguf file or a folder (with several recipe outputs: their folder).",
        ),
    ] = None,
    imatrix: Imatrix = None,
    tensor_type: TensorType = None,
    output_tensor_type: OutputTensorType = None,
    token_embedding_type: TokenEmbeddingType = None,
    pure: Pure = False,
    dry_run: DryRun = False,
    tokenizer_pre: TokenizerPre = None,
    all_experts: Annotated[
        bool,
        typer.Option(
            "--all-experts",
            help="MoE: every calibration token through every expert, so each gets statistics "
            "and a Hessian (the routed output is unchanged).",
        ),
    ] = False,
    strict: Strict = False,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    nproc: Nproc = None,
    json_out: JsonFlag = False,
) -> None:
    """Quantize: RTN, GPTQ or BitNet on any grid (GGUF types byte-identical to llama-quantize,
    integer schemes, ternary), written as GGUF, GPTQ, compressed-tensors or BitNet.

    Examples:

      qtool quantize ./smollm2 --type Q4_K_M -o smollm2-q4km.gguf

      qtool quantize ./smollm2 --method gptq --type Q4_K_M -d canterbury -o smollm2-gptq.gguf

      qtool quantize ./smollm2 --method gptq --bits 4 -d canterbury -o smollm2-gptq-w4g128

      qtool quantize ./smollm2 --method rtn --bits 8 -g -1 --act-bits 8 -o smollm2-w8a8

      qtool quantize ./smollm2 --recipe recipes/gptq-w4a16.yaml -o out --dry-run
    """
    from qtool import api
    from qtool.output import reporter

    if nproc is not None and not dry_run:
        from qtool.cli.launch import relaunch_if

        relaunch_if(nproc)
    out = sink(json_out)
    options: dict[str, Any] = {
        "method": method,
        "type": qtype,
        "bits": bits,
        "group_size": group_size,
        "granularity": granularity,
        "asym": asym,
        "restricted": restricted or None,
        "clip": clip,
        "format": format,
        "act_bits": act_bits,
        "act_static": act_static or None,
        "smoothquant": smoothquant,
        "stats": stats,
        "dataset": dataset,
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "batch_size": batch_size,
        "damp": damp,
        "block_size": block_size,
        "act_order": act_order,
        "static_groups": static_groups,
        "true_sequential": true_sequential,
        "imatrix": imatrix,
        "tensor_type": tensor_type or None,
        "output_tensor_type": output_tensor_type,
        "token_embedding_type": token_embedding_type,
        "pure": pure or None,
        "tokenizer_pre": tokenizer_pre,
        "strict": strict or None,
        "all_experts": all_experts or None,
        "compute_dtype": compute_dtype,
    }
    given = {k: v for k, v in options.items() if v is not None}
    if recipe is not None and given:
        from qtool.recipe import FLAGS, RecipeError

        k = next(iter(given))
        raise RecipeError(
            f"{FLAGS[k]}: the recipe sets the quantization",
            hint="edit the recipe, or drop --recipe and use flags alone",
        )
    with reporter(out) as rep:
        res = api.quantize(
            src,
            recipe,
            output=output,
            dry_run=dry_run,
            resume=resume,
            device=device,
            max_memory=max_memory,
            max_gpu_memory=max_gpu_memory,
            eval_dataset=eval_dataset,
            eval_ctx=eval_ctx,
            eval_chunks=eval_chunks,
            revision=revision,
            allow_pickle=allow_pickle,
            reporter=rep,
            **({} if recipe is not None else given),
        )
    data = res.data
    if dry_run:
        out.result(data, lambda c: render_plan(c, data))
    else:
        out.result(data, lambda c: render(c, data))


def render_plan(console: Console, d: dict[str, Any]) -> None:
    """``--dry-run``: every output's tensors with method, grid or type, and bytes."""
    for o in d["outputs"]:
        t = Table(title=f"plan: {o['format']} -> {o['path'] or '(no path)'}", title_justify="left")
        for col in ("tensor", "shape", "method", "grid / type"):
            t.add_column(col)
        t.add_column("bytes", justify="right")
        for e in o["tensors"]:
            t.add_row(
                e["name"],
                "×".join(map(str, e["shape"])),
                e["method"] or "-",
                e["grid"] or "as stored",
                f"{e['bytes']:,}",
            )
        console.print(t)
        grids = ", ".join(f"{k} ×{v}" for k, v in o["grids"].items())
        console.print(
            f"tensor data {o['tensor_bytes']:,} bytes ({o['tensor_bytes'] / 2**20:.2f} MiB); "
            f"grids: {grids}; metadata, scales' headers and vocabulary add a little"
        )


def render(console: Console, d: dict[str, Any]) -> None:
    """What was written (each output), the per-layer GPTQ vs RTN errors, quality if measured."""
    footprint = next((o.get("footprint") for o in d["outputs"] if o.get("footprint")), None)
    if footprint:
        from qtool.cli.inspect import render as render_footprint

        render_footprint(console, footprint)
    for o in d["outputs"]:
        if o["format"] == "gguf":
            types = ", ".join(f"{k} ×{v}" for k, v in o["types"].items())
            methods = ", ".join(f"{k} ×{v}" for k, v in o.get("methods", {}).items())
            v = o.get("vocab") or {}
            console.print(
                f"wrote {o['path']}: {o['bytes']:,} bytes ({o['bytes'] / 2**20:.2f} MiB), "
                f"{o['bits_per_weight']:.3f} bits/weight, {o['preset']} ({types}); "
                f"methods: {methods or 'none'}; vocab {v.get('model')}/{v.get('pre')} "
                f"{v.get('tokens')} tokens"
            )
        elif o["format"] in ("gptq", "compressed-tensors"):
            _render_int(console, o, d)
        else:
            console.print(f"wrote {o['path']}: {o['format']}, {o['bytes']:,} bytes")
    if d.get("layers"):
        n = len(d["layers"])
        console.print(f"GPTQ vs RTN: lower output error on {d['gptq_better_than_rtn']}/{n} linears")
        t = Table(
            title="Relative output error ||(W-Q)X|| / ||WX|| per layer (mean over linears)",
            title_justify="left",
        )
        for col in ("layer", "grid", "GPTQ", "RTN"):
            t.add_column(col, justify="left" if col in ("layer", "grid") else "right")
        by: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in d["layers"]:
            key = (r["name"].rsplit(".", 2)[0], r.get("grid", ""))
            by.setdefault(key, []).append((r["gptq_rel_error"], r["rtn_rel_error"]))
        for (layer, grid), v in by.items():
            t.add_row(
                layer,
                grid,
                f"{sum(a for a, _ in v) / len(v):.4f}",
                f"{sum(b for _, b in v) / len(v):.4f}",
            )
        console.print(t)
    console.print(f"time {d['seconds']:.1f} s")


def _render_int(console: Console, o: dict[str, Any], d: dict[str, Any]) -> None:
    s = o["scheme"]
    head = Table(title=f"{o['path']} ({o['format']})", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    g = s["group_size"] if s["granularity"] == "group" else s["granularity"]
    methods = ", ".join(f"{k} ×{v}" for k, v in o.get("methods", {}).items())
    head.add_row(
        "method",
        f"{methods}: {s['bits']}-bit, group {g}, {'sym' if s['sym'] else 'asym'}, clip {s['clip']}",
    )
    if o.get("activations"):
        a = o["activations"]
        head.add_row(
            "activations",
            "int8 "
            + ("per token (dynamic)" if a["dynamic"] else "per tensor (static)")
            + (f", SmoothQuant α={a['smoothquant']}" if a["smoothquant"] is not None else ""),
        )
    if o.get("bytes"):
        head.add_row("size", f"{o['bytes']:,} bytes ({o['bytes'] / 2**20:.1f} MiB)")
    if o.get("bits_per_weight"):
        head.add_row("bits/weight", f"{o['bits_per_weight']:.3f} (all tensors, scales included)")
    for k, v in (o.get("quality") or {}).items():
        head.add_row(k, str(v))
    console.print(head)
