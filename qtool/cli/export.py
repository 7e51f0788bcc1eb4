"""``qtool export``: write a checkpoint as GGUF (llama.cpp) with any type or preset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from qtool.checkpoint import open_checkpoint
from qtool.cli.options import AllowPickle, JsonFlag, Revision, Source
from qtool.errors import BadInputError
from qtool.output import get_output

Outtype = Annotated[
    str,
    typer.Option(
        "--outtype",
        "--type",
        help="A GGUF type or llama-quantize preset: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
        "Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, TQ1_0, TQ2_0.",
    ),
]
Output_ = Annotated[Path | None, typer.Option("-o", "--output", help="The .gguf file to write.")]
Imatrix = Annotated[
    Path | None, typer.Option("--imatrix", help="Importance matrix (llama-imatrix GGUF or .dat).")
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
    bool, typer.Option("--dry-run", help="Print the plan (every tensor, type, bytes) and exit.")
]
TokenizerPre = Annotated[
    str | None,
    typer.Option("--tokenizer-pre", help="llama.cpp pre-tokenizer name, if it is not recognised."),
]


def export_cmd(
    src: Source,
    format: Annotated[str, typer.Option("--format", help="Output format: gguf.")] = "gguf",
    outtype: Outtype = "F16",
    output: Output_ = None,
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
    """Write or convert to GGUF (llama.cpp loads it), streamed tensor by tensor.

    Examples:

      qtool export ./smollm2 --format gguf --outtype F16 -o smollm2-f16.gguf

      qtool export meta-llama/Llama-3.2-1B --outtype Q4_K_M -o llama-q4km.gguf --dry-run
    """
    if format.lower() != "gguf":
        raise BadInputError(f"--format {format!r} is not supported yet", hint="use --format gguf")
    run_gguf_export(
        src,
        outtype,
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


def run_gguf_export(
    src: str,
    outtype: str,
    output: Path | None,
    *,
    imatrix: Path | None,
    tensor_type: list[str] | None,
    output_tensor_type: str | None,
    token_embedding_type: str | None,
    pure: bool,
    dry_run: bool,
    tokenizer_pre: str | None,
    revision: str | None,
    allow_pickle: bool,
    json_out: bool,
) -> None:
    """Shared by ``export --format gguf`` and ``quantize --method kquant``."""
    from qtool.export.gguf_export import export_gguf, make_plan
    from qtool.export.imatrix_read import check_imatrix, read_imatrix
    from qtool.footprint import build_report
    from qtool.io import check_writable
    from qtool.kernels.types import get_type
    from qtool.policy import resolve_preset

    out = get_output()
    out.json_mode = json_out
    try:
        preset = resolve_preset(outtype)
    except ValueError as e:
        raise BadInputError(str(e)) from e
    overrides = []
    for spec in tensor_type or []:
        if "=" not in spec:
            raise BadInputError(f"--tensor-type {spec!r}: expected PATTERN=TYPE, e.g. attn_v=Q6_K")
        pattern, qtype = spec.rsplit("=", 1)
        overrides.append((pattern, qtype))
    for label, t in [
        ("--output-tensor-type", output_tensor_type),
        ("--token-embedding-type", token_embedding_type),
    ] + [("--tensor-type", q) for _, q in overrides]:
        if t is not None:
            try:
                get_type(t)
            except KeyError as e:
                raise BadInputError(f"{label}: {e.args[0]}") from e
    if output is None and not dry_run:
        raise BadInputError("no output file", hint="pass -o FILE.gguf (or --dry-run)")
    if output is not None:
        check_writable(output)
    ckpt = open_checkpoint(src, revision=revision, allow_pickle=allow_pickle)
    imat = read_imatrix(imatrix) if imatrix is not None else None
    plan, arch = make_plan(
        ckpt,
        preset,
        overrides=overrides,
        output_type=output_tensor_type,
        token_embedding_type=token_embedding_type,
        pure=pure,
        has_imatrix=imat is not None,
    )
    if imat is not None and imatrix is not None:
        check_imatrix(imat, {e.name: e.shape[-1] for e in plan.entries}, imatrix)
    data: dict[str, Any] = {
        "source": src,
        "output": str(output) if output else None,
        "preset": preset,
        "arch": plan.arch,
        "tensor_bytes": plan.tensor_bytes,
        "types": plan.type_counts(),
        "tensors": [
            {"name": e.name, "shape": list(e.shape), "type": e.qtype, "bytes": e.nbytes}
            for e in plan.entries
        ],
    }
    if dry_run:
        out.result({**data, "dry_run": True}, lambda c: _render_plan(c, data))
        return
    assert output is not None
    size = export_gguf(ckpt, output, plan, arch, out, imatrix=imat, tokenizer_pre=tokenizer_pre)
    report = build_report(ckpt)
    n_params = int(report.params["total"])  # type: ignore[call-overload]
    data.update(file_bytes=size, vocab=plan.vocab, bits_per_weight=8 * size / n_params)
    data["footprint"] = report.as_dict()
    out.result(data, lambda c: _render_done(c, data))


def _render_plan(console: Any, d: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"GGUF plan: {d['preset']} ({d['arch']})", title_justify="left")
    for col in ("tensor", "shape", "type"):
        t.add_column(col)
    t.add_column("bytes", justify="right")
    for e in d["tensors"]:
        t.add_row(e["name"], "×".join(map(str, e["shape"])), e["type"], f"{e['bytes']:,}")
    console.print(t)
    types = ", ".join(f"{k} ×{v}" for k, v in d["types"].items())
    console.print(
        f"tensor data {d['tensor_bytes']:,} bytes ({d['tensor_bytes'] / 2**20:.2f} MiB)"
        f"; types: {types}; metadata and vocabulary add a few MB"
    )


def _render_done(console: Any, d: dict[str, Any]) -> None:
    from qtool.cli.inspect import render

    render(console, d["footprint"])
    types = ", ".join(f"{k} ×{v}" for k, v in d["types"].items())
    console.print(
        f"wrote {d['output']}: {d['file_bytes']:,} bytes ({d['file_bytes'] / 2**20:.2f} MiB), "
        f"{d['bits_per_weight']:.3f} bits/weight, {d['preset']} ({types}), "
        f"vocab {d['vocab'].get('model')}/{d['vocab'].get('pre')} {d['vocab'].get('tokens')} tokens"
    )
