"""``qtool quantize``: GGUF k-quants, RTN with clipping, GPTQ, W8A8, BitNet ternary."""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qtool.cli.export import (
    DryRun,
    Imatrix,
    OutputTensorType,
    Pure,
    TensorType,
    TokenEmbeddingType,
    TokenizerPre,
    run_gguf_export,
)
from qtool.cli.options import AllowPickle, JsonFlag, Revision, Source
from qtool.errors import BadInputError
from qtool.output import get_output

METHODS = ("kquant", "rtn", "gptq", "bitnet")


def quantize_cmd(
    src: Source,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="kquant (GGUF k-quants), rtn (round-to-nearest), gptq, bitnet (ternary).",
        ),
    ] = "kquant",
    qtype: Annotated[
        str | None,
        typer.Option(
            "--type", help="kquant: a GGUF type or preset, e.g. Q4_K_M; bitnet: TQ1_0/TQ2_0."
        ),
    ] = None,
    bits: Annotated[int | None, typer.Option("--bits", help="rtn/gptq: 2 to 8.")] = None,
    group_size: Annotated[
        int,
        typer.Option("--group-size", "-g", help="Input columns per scale; -1: one per channel."),
    ] = 128,
    granularity: Annotated[
        str | None,
        typer.Option("--granularity", help="tensor, channel or group \\[default: from -g]."),
    ] = None,
    asym: Annotated[
        bool, typer.Option("--asym/--sym", help="Zero-point (asymmetric) or absmax (symmetric).")
    ] = False,
    restricted: Annotated[
        bool,
        typer.Option("--restricted", help="Symmetric grid ±(2^(b-1)-1), code 0 unused."),
    ] = False,
    clip: Annotated[
        str, typer.Option("--clip", help="Range clipping: none, percentile:P, mse, kl.")
    ] = "none",
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="gptq or compressed-tensors (rtn/gptq), gguf or safetensors (bitnet) "
            "\\[default: gptq for GPTQ at 2/3/4/8 bits, compressed-tensors otherwise; gguf for "
            "bitnet].",
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
        typer.Option("--smoothquant", help="W8A8: SmoothQuant migration strength alpha (0.5)."),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option("--stats", help="Activation statistics from `qtool calibrate` (W8A8)."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", "-d", help="Calibration data (as qtool calibrate): GPTQ, W8A8 static."
        ),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Calibration samples.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", "-L", help="Tokens per sample.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Picks the calibration windows.")] = 0,
    damp: Annotated[
        float, typer.Option("--damp", help="GPTQ: dampening, fraction of mean diag(H).")
    ] = 0.01,
    block_size: Annotated[
        int, typer.Option("--block-size", help="GPTQ: columns per lazy update.")
    ] = 128,
    act_order: Annotated[
        bool, typer.Option("--act-order/--no-act-order", help="GPTQ: desc_act.")
    ] = False,
    static_groups: Annotated[
        bool, typer.Option("--static-groups", help="GPTQ: group scales fixed before act-order.")
    ] = False,
    true_sequential: Annotated[
        bool,
        typer.Option(
            "--true-sequential/--no-true-sequential",
            help="GPTQ: each group of linears sees the earlier ones quantized.",
        ),
    ] = True,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="GPTQ: continue the interrupted run kept in this folder."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="GPTQ: auto (GPU if present), cpu, cuda:N.")
    ] = "auto",
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
        typer.Option("-o", "--output", help="Output: a folder (safetensors) or a .gguf file."),
    ] = None,
    imatrix: Imatrix = None,
    tensor_type: TensorType = None,
    output_tensor_type: OutputTensorType = None,
    token_embedding_type: TokenEmbeddingType = None,
    pure: Pure = False,
    dry_run: DryRun = False,
    tokenizer_pre: TokenizerPre = None,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    json_out: JsonFlag = False,
) -> None:
    """Quantize weights: GGUF k-quants (byte-identical to llama-quantize), RTN, GPTQ, W8A8,
    BitNet ternary.

    Examples:

      qtool quantize ./smollm2 --method kquant --type Q4_K_M -o smollm2-q4km.gguf

      qtool quantize ./smollm2 --method gptq --bits 4 -d canterbury -o smollm2-gptq-w4g128

      qtool quantize ./smollm2 --method rtn --bits 4 --clip mse --format compressed-tensors -o out

      qtool quantize ./smollm2 --method rtn --bits 8 -g -1 --act-bits 8 -o smollm2-w8a8
    """
    if method not in METHODS:
        raise BadInputError(f"--method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method == "kquant":
        if qtype is None:
            raise BadInputError("--method kquant needs --type", hint="e.g. --type Q4_K_M")
        run_gguf_export(
            src,
            qtype,
            output,
            imatrix=imatrix,
            tensor_type=tensor_type,
            output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type,
            pure=pure,
            dry_run=dry_run,
            tokenizer_pre=tokenizer_pre,
            revision=revision,
            allow_pickle=allow_pickle,
            json_out=json_out,
        )
        return
    if method == "bitnet":
        from qtool.cli.bitnet import run_bitnet

        run_bitnet(
            src,
            output,
            qtype=qtype,
            format=format,
            variant="ternary" if bits in (None, 2) else "binary" if bits == 1 else "",
            tokenizer_pre=tokenizer_pre,
            revision=revision,
            json_out=json_out,
        )
        return
    _run_integer(
        src,
        method=method,
        bits=bits,
        group_size=group_size,
        granularity=granularity,
        asym=asym,
        restricted=restricted,
        clip=clip,
        format=format,
        act_bits=act_bits,
        act_static=act_static,
        smoothquant=smoothquant,
        stats=stats,
        dataset=dataset,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        damp=damp,
        block_size=block_size,
        act_order=act_order,
        static_groups=static_groups,
        true_sequential=true_sequential,
        resume=resume,
        device=device,
        eval_dataset=eval_dataset,
        eval_ctx=eval_ctx,
        eval_chunks=eval_chunks,
        output=output,
        revision=revision,
        json_out=json_out,
    )


def _run_integer(src: str, **o: Any) -> None:
    from qtool.calibrate.pipeline import CalibrateOptions
    from qtool.cli.calibrate import StageBars
    from qtool.io import check_writable
    from qtool.quantize.gptq import GPTQConfig
    from qtool.quantize.pipeline import QuantizeOptions, run_quantize
    from qtool.quantize.scheme import Clip, QuantScheme

    out = get_output()
    out.json_mode = o["json_out"]
    if o["bits"] is None:
        raise BadInputError(f"--method {o['method']} needs --bits", hint="e.g. --bits 4")
    gran: Any = o["granularity"] or ("channel" if o["group_size"] == -1 else "group")
    if gran == "group" and o["group_size"] < 1:
        raise BadInputError(
            f"--group-size {o['group_size']}: must be positive, or -1 for one scale per channel"
        )
    scheme = QuantScheme(
        bits=o["bits"],
        sym=not o["asym"],
        granularity=gran,
        group_size=o["group_size"] if gran == "group" else 128,
        restricted=o["restricted"],
        clip=Clip.parse(o["clip"]),
    )
    if o["block_size"] < 1:
        raise BadInputError(f"--block-size {o['block_size']}: must be positive")
    if not 0 < o["damp"] <= 1:
        raise BadInputError(f"--damp {o['damp']}: must be in (0, 1]")
    if o["output"] is None:
        raise BadInputError("no output folder", hint="pass -o FOLDER")
    output: Path = o["output"]
    if output.suffix == ".gguf":
        raise BadInputError(
            f"-o {output}: --method {o['method']} writes a safetensors folder",
            hint="for GGUF use --method kquant --type Q4_K_M (or qtool export)",
        )
    check_writable(output)
    opts = QuantizeOptions(
        method=o["method"],
        scheme=scheme,
        output=output,
        format=o["format"],
        act_bits=o["act_bits"],
        act_static=o["act_static"],
        smooth_alpha=o["smoothquant"],
        stats=o["stats"],
        calib=CalibrateOptions(
            dataset=o["dataset"] or "wikitext2",
            samples=o["samples"],
            seq_len=o["seq_len"],
            seed=o["seed"],
            device=o["device"],
        ),
        calib_given=o["dataset"] is not None,
        gptq=GPTQConfig(
            damp=o["damp"],
            block_size=o["block_size"],
            act_order=o["act_order"],
            static_groups=o["static_groups"],
        ),
        true_sequential=o["true_sequential"],
        resume=o["resume"],
        measure_dataset=o["eval_dataset"],
        measure_ctx=o["eval_ctx"],
        measure_chunks=o["eval_chunks"],
        command="qtool " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )

    def log(message: str) -> None:
        if message.startswith("warning: "):
            out.warn(message.removeprefix("warning: "))
        else:
            out.info(message)

    live = out.show_progress and out.stderr.is_terminal
    with out.progress() if live else contextlib.nullcontext() as bar:
        res = run_quantize(src, opts, revision=o["revision"], progress=StageBars(out, bar), log=log)
    out.result(res.data, lambda c: render(c, res.data))


def render(console: Console, d: dict[str, Any]) -> None:
    """What was written, the per-layer GPTQ vs RTN errors (summary), and quality if measured."""
    if d.get("footprint"):
        from qtool.cli.inspect import render as render_footprint

        render_footprint(console, d["footprint"])
    s = d["scheme"]
    head = Table(title=f"{d['output']} ({d['format']})", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    g = s["group_size"] if s["granularity"] == "group" else s["granularity"]
    head.add_row(
        "method",
        f"{d['method']} {s['bits']}-bit, group {g}, "
        f"{'sym' if s['sym'] else 'asym'}, clip {s['clip']}",
    )
    if d.get("activations"):
        a = d["activations"]
        head.add_row(
            "activations",
            "int8 "
            + ("per token (dynamic)" if a["dynamic"] else "per tensor (static)")
            + (f", SmoothQuant α={a['smoothquant']}" if a["smoothquant"] is not None else ""),
        )
    if d.get("bytes"):
        head.add_row("size", f"{d['bytes']:,} bytes ({d['bytes'] / 2**20:.1f} MiB)")
    if d.get("bits_per_weight"):
        head.add_row("bits/weight", f"{d['bits_per_weight']:.3f} (all tensors, scales included)")
    head.add_row("time", f"{d['seconds']:.1f} s")
    for k, v in (d.get("quality") or {}).items():
        head.add_row(k, str(v))
    if d.get("layers"):
        n = len(d["layers"])
        head.add_row(
            "GPTQ vs RTN", f"lower output error on {d['gptq_better_than_rtn']}/{n} linears"
        )
    console.print(head)
    if d.get("layers"):
        t = Table(
            title="Relative output error ||(W-Q)X|| / ||WX|| per layer (mean over linears)",
            title_justify="left",
        )
        for col in ("layer", "GPTQ", "RTN"):
            t.add_column(col, justify="right" if col != "layer" else "left")
        by: dict[str, list[tuple[float, float]]] = {}
        for r in d["layers"]:
            key = r["name"].rsplit(".", 2)[0]
            by.setdefault(key, []).append((r["gptq_rel_error"], r["rtn_rel_error"]))
        for k, v in by.items():
            t.add_row(
                k, f"{sum(a for a, _ in v) / len(v):.4f}", f"{sum(b for _, b in v) / len(v):.4f}"
            )
        console.print(t)
