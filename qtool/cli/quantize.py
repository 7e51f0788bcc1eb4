"""``qtool quantize``: GGUF k-quants today; RTN, GPTQ and BitNet are issue 6."""

from __future__ import annotations

from typing import Annotated

import typer

from qtool.cli._pending import pending
from qtool.cli.export import (
    DryRun,
    Imatrix,
    Output_,
    OutputTensorType,
    Pure,
    TensorType,
    TokenEmbeddingType,
    TokenizerPre,
    run_gguf_export,
)
from qtool.cli.options import AllowPickle, JsonFlag, Revision, Source
from qtool.errors import BadInputError

METHODS = ("kquant", "rtn", "gptq", "bitnet")


def quantize_cmd(
    src: Source,
    method: Annotated[
        str, typer.Option("--method", help="kquant (GGUF); rtn, gptq, bitnet: not yet.")
    ] = "kquant",
    qtype: Annotated[
        str | None, typer.Option("--type", help="For kquant: a GGUF type or preset, e.g. Q4_K_M.")
    ] = None,
    bits: Annotated[
        int | None, typer.Option("--bits", help="For rtn/gptq: 2 to 8 (not yet).")
    ] = None,
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
    """Quantize weights: GGUF k-quant presets byte-identical to llama-quantize.

    Examples:

      qtool quantize ./smollm2 --method kquant --type Q4_K_M -o smollm2-q4km.gguf

      qtool quantize ./smollm2 --method kquant --type Q3_K_M --imatrix imat.gguf -o q3.gguf
    """
    if method not in METHODS:
        raise BadInputError(f"--method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method != "kquant":
        raise pending(f"quantize --method {method}", "issue 6")
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
