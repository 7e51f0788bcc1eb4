"""Option aliases shared by every command, declared once, and the output sink set-up."""

from __future__ import annotations

from typing import Annotated

import typer

from qtool.output import Output, get_output

Source = Annotated[
    str,
    typer.Argument(
        help="A Hugging Face repo id (org/name), a local checkpoint folder, or a .gguf file.",
        show_default=False,
    ),
]
Revision = Annotated[
    str | None, typer.Option("--revision", help="Hub branch, tag or commit (Hub ids only).")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow pickle (.bin/.pt) checkpoints: they can run code. Trusted sources only.",
    ),
]


MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Host memory budget (e.g. 16GiB): calibration caches go to disk past it; a run "
        "that cannot fit is refused before it starts.",
    ),
]
MaxGpuMemory = Annotated[
    str | None,
    typer.Option("--max-gpu-memory", help="GPU memory budget (e.g. 70GiB)."),
]
ComputeDtype = Annotated[
    str | None,
    typer.Option(
        "--compute-dtype",
        help="Forward passes' dtype: auto (bfloat16 where fast: GPUs, CPUs with AMX; else "
        "float32), float32, bfloat16, float16 \\[auto].",
    ),
]
Nproc = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="Run as N processes on this machine (torch.distributed: samples shared out, "
        "GPTQ's linears solved in parallel; the same output as one process). Several "
        "machines: torchrun --nnodes ... -m qtool.",
        show_default=False,
    ),
]


def output(json_out: bool) -> Output:
    """The sink, in JSON mode when ``--json`` was given before or after the command."""
    out = get_output()
    out.json_mode = out.json_mode or json_out
    return out
