"""``qtool export``: a checkpoint as GGUF (any type or preset) or as dense HF safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli.options import AllowPickle, JsonFlag, Revision, Source
from qtool.cli.options import output as sink
from qtool.cli.quantize import (
    DryRun,
    Imatrix,
    OutputTensorType,
    Pure,
    Strict,
    TensorType,
    TokenEmbeddingType,
    TokenizerPre,
    render,
    render_plan,
)

Outtype = Annotated[
    str,
    typer.Option(
        "--outtype",
        "--type",
        help="GGUF: a type or llama-quantize preset: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, "
        "Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, TQ1_0, TQ2_0.",
    ),
]


def export_cmd(
    src: Source,
    format: Annotated[
        str, typer.Option("--format", help="gguf, or safetensors (an HF checkpoint folder).")
    ] = "gguf",
    outtype: Outtype = "F16",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="safetensors: float32, float16, bfloat16 or auto (the source's precision).",
        ),
    ] = "auto",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="The .gguf file or folder to write.")
    ] = None,
    imatrix: Imatrix = None,
    tensor_type: TensorType = None,
    output_tensor_type: OutputTensorType = None,
    token_embedding_type: TokenEmbeddingType = None,
    pure: Pure = False,
    dry_run: DryRun = False,
    tokenizer_pre: TokenizerPre = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="GGUF: continue the interrupted export of this output (killed, power loss, or "
            "Ctrl-C of a run given --resume) from its checkpoint OUTPUT.qtool-partial/, checked "
            "to be this very run's; the file is byte-identical to an uninterrupted export. "
            "Without it such a checkpoint is refused, not replaced.",
        ),
    ] = False,
    strict: Strict = False,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    json_out: JsonFlag = False,
) -> None:
    """Write or convert: to GGUF (llama.cpp loads it; a GGUF source is requantized as
    llama-quantize does), or to a Hugging Face safetensors folder (e.g. from a GGUF file).

    Examples:

      qtool export ./smollm2 --format gguf --outtype F16 -o smollm2-f16.gguf

      qtool export model-f16.gguf --outtype Q4_K_M -o model-q4km.gguf

      qtool export model.Q4_K_M.gguf --format safetensors -o model-hf

      qtool export ./llama-70b --outtype Q4_K_M -o l70.gguf --resume   # after a crash
    """
    from qtool import api
    from qtool.output import reporter

    out = sink(json_out)
    with reporter(out) as rep:
        res = api.export(
            src,
            format=format.lower(),
            type=outtype,
            dtype=dtype,
            output=output,
            dry_run=dry_run,
            imatrix=imatrix,
            tensor_type=tensor_type,
            output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type,
            pure=pure,
            tokenizer_pre=tokenizer_pre,
            resume=resume,
            strict=strict,
            revision=revision,
            allow_pickle=allow_pickle,
            reporter=rep,
        )
    data = res.data
    out.result(data, lambda c: (render_plan if dry_run else render)(c, data))
