"""``qtool calibrate``: activation statistics and an importance matrix, one layer at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qtool.cli.options import JsonFlag, MaxGpuMemory, MaxMemory, Nproc, Revision, Source
from qtool.cli.options import output as sink


def calibrate_cmd(
    src: Source,
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            "-d",
            help="A named set (wikitext2, c4, pile-val, canterbury), a local "
            ".txt/.jsonl/.parquet/.csv file or folder, or a Hub spec "
            "org/name[:config]:split[:field].",
        ),
    ] = "wikitext2",
    samples: Annotated[
        int, typer.Option("--samples", "-n", help="Samples (windows) to run.")
    ] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", "-L", help="Tokens per sample.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Picks the windows (deterministic).")] = 0,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Stats file (safetensors + JSON metadata) \\[default: ./MODEL.calib.safetensors]",
        ),
    ] = None,
    imatrix: Annotated[
        Path | None,
        typer.Option(
            "--imatrix",
            help="Also write llama.cpp's importance matrix "
            "(GGUF; the legacy format if FILE ends in .dat).",
        ),
    ] = None,
    imatrix_output: Annotated[
        bool,
        typer.Option(
            "--imatrix-output",
            help="Include output.weight in the imatrix (llama-imatrix's --process-output).",
        ),
    ] = False,
    text_field: Annotated[
        str | None,
        typer.Option(
            "--text-field",
            help="Column holding the text \\[default: text, or the only string column].",
        ),
    ] = None,
    dataset_revision: Annotated[
        str | None,
        typer.Option("--dataset-revision", help="Hub dataset branch, tag or commit (Hub specs)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="Tokenizer folder or Hub id \\[default: the model's]."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per forward.")] = 1,
    device: Annotated[
        str, typer.Option("--device", help="auto (GPU if present), cpu, cuda, cuda:N.")
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--compute-dtype",
            "--dtype",
            help="Forward passes' dtype: auto (bfloat16 where fast, else float32), float32, "
            "bfloat16, float16; statistics accumulate in float32/float64.",
        ),
    ] = "auto",
    max_memory: MaxMemory = None,
    max_gpu_memory: MaxGpuMemory = None,
    hessian: Annotated[
        bool,
        typer.Option("--hessian", help="Also store GPTQ's Σ x xᵀ per distinct input (large)."),
    ] = False,
    all_experts: Annotated[
        bool,
        typer.Option(
            "--all-experts",
            help="MoE: run every token through every expert for the statistics (the output "
            "still uses the routed ones).",
        ),
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Rows in the outlier table.")] = 10,
    outlier_factor: Annotated[
        float,
        typer.Option(
            "--outlier-factor", help="A channel is an outlier above this x median absmax."
        ),
    ] = 20.0,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the interrupted calibration kept in this folder "
            "(STATS.qtool-calibrate, named when the run starts).",
        ),
    ] = None,
    revision: Revision = None,
    nproc: Nproc = None,
    json_out: JsonFlag = False,
) -> None:
    """Collect activation statistics and an importance matrix, one decoder layer at a time.

    Examples:

      qtool calibrate ./smollm2 -d canterbury -n 64 -L 512 --imatrix smollm2.imatrix.gguf

      qtool calibrate meta-llama/Llama-3.1-8B -d wikitext2 -o llama.calib.safetensors --json
    """
    from qtool import api
    from qtool.output import reporter

    if nproc is not None:
        from qtool.cli.launch import relaunch_if

        relaunch_if(nproc)
    out = sink(json_out)
    with reporter(out) as rep:
        res = api.calibrate(
            src,
            dataset=dataset,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
            output=output,
            imatrix=imatrix,
            imatrix_output=imatrix_output,
            text_field=text_field,
            dataset_revision=dataset_revision,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            hessian=hessian,
            all_experts=all_experts,
            max_memory=max_memory,
            max_gpu_memory=max_gpu_memory,
            revision=revision,
            top=top,
            outlier_factor=outlier_factor,
            resume=resume,
            reporter=rep,
        )
    out.result(res.data, lambda console: render(console, res.data))


def render(console: Console, d: dict[str, Any]) -> None:
    """The human report: what was measured, and the most outlier-heavy inputs."""
    ds = d["dataset"]
    head = Table(title=d["model"], show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    revision = ds.get("resolved_revision") or ds.get("revision")
    rows = [
        ("dataset", ds["spec"] + (f" @ {revision[:12]}" if revision else "")),
        ("samples", f"{ds['samples']} x {ds['seq_len']} tokens (seed {ds['seed']})"),
        ("tokens seen", f"{d['tokens_seen']:,}"),
        ("tokens sha256", ds["tokens_sha256"]),
        ("linear layers", str(d["linear_layers"])),
        ("device / dtype", f"{d['device']} / {d['dtype']}"),
        ("time", f"{d['seconds']:.1f} s"),
        ("stats file", d["stats_file"]),
    ]
    if d["imatrix_file"]:
        rows.append(("imatrix", f"{d['imatrix_file']} ({d['imatrix_entries']} entries)"))
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    t = Table(
        title=f"Most outlier-heavy inputs (outlier: channel absmax > {d['outlier_factor']:g} x "
        "median)",
        title_justify="left",
    )
    for col, just in (
        ("layer input", "left"),
        ("channels", "right"),
        ("max absmax", "right"),
        ("median", "right"),
        ("max/median", "right"),
        ("outliers", "right"),
        ("top channel", "right"),
        ("p99.9 |x|", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in d["outliers"]:
        t.add_row(
            r["layer"],
            str(r["in_features"]),
            f"{r['max_absmax']:.3g}",
            f"{r['median_absmax']:.3g}",
            f"{r['ratio']:.1f}",
            str(r["outlier_channels"]),
            str(r["top_channel"]),
            f"{r['p99_9']:.3g}",
        )
    console.print(t)
    if d.get("experts"):
        render_coverage(console, d["experts"])


def render_coverage(console: Console, moe: dict[str, Any]) -> None:
    """Tokens routed to each expert, per MoE layer; starved experts flagged."""
    t = Table(
        title=f"Expert coverage: tokens routed per expert ({moe['top_k']} of {moe['n_expert']} "
        f"per token{'; statistics from every token' if moe['all_experts'] else ''}); starved: "
        f"< {moe['min_tokens']} tokens",
        title_justify="left",
    )
    for col in ("layer", "min", "median", "max", "starved experts"):
        t.add_column(col, justify="left" if col.startswith(("layer", "starved")) else "right")
    for r in moe["layers"]:
        starved = ", ".join(f"{e} ({n})" for e, n in r["starved"][:12])
        more = len(r["starved"]) - 12
        t.add_row(
            str(r["layer"]),
            str(r["min"]),
            str(r["median"]),
            str(r["max"]),
            (starved + (f" +{more} more" if more > 0 else "")) or "-",
        )
    console.print(t)
