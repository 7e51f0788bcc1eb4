"""``qtool eval``: perplexity, KL divergence and top-1 agreement of artifacts vs the base model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from qtool.cli.options import JsonFlag
from qtool.cli.options import output as sink
from qtool.errors import UnsupportedError
from qtool.io import check_writable


def eval_command(
    artifacts: Annotated[
        list[str],
        typer.Argument(
            help="Artifacts to evaluate: HF checkpoint folders or Hub ids (plain, "
            "compressed-tensors, GPTQ), or .gguf files.",
            show_default=False,
        ),
    ],
    base: Annotated[
        str,
        typer.Option(
            "--base",
            help="The unquantized model the artifacts come from: reference for KLD and "
            "source of the tokenizer and (for GGUF artifacts) the architecture.",
            show_default=False,
        ),
    ],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            help="Text to score: a text file, a folder of .txt files, or canterbury:FILE "
            "(e.g. canterbury:plrabn12.txt, from `make assets`).",
            show_default=False,
        ),
    ],
    ctx: Annotated[
        int, typer.Option("--ctx", min=2, help="Window length in tokens.", show_default=False)
    ],
    chunks: Annotated[
        int | None,
        typer.Option("--chunks", min=1, help="Number of windows (default: all that fit)."),
    ] = None,
    scoring: Annotated[
        str,
        typer.Option(
            "--scoring",
            help="full: every position of a window; second-half: its second half only, as "
            "llama-perplexity scores.",
        ),
    ] = "full",
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="torch: GGUF files decoded exactly into the base architecture; llama.cpp: GGUF "
            "files run by llama-cpp-python. Safetensors checkpoints always run on torch.",
        ),
    ] = "torch",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="Compute dtype of the torch models: float32, bfloat16, float16."
        ),
    ] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, help="CPU threads for torch and llama.cpp (default: all cores)."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Keep the running totals in this state file (saved as windows complete, and "
            "on Ctrl-C); rerun with the same file and settings after a crash to skip the "
            "windows done, with the numbers of an uninterrupted run. Another evaluation's file "
            "is refused; a completed run deletes it.",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG of bits per weight against KLD (matplotlib)."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Perplexity, KL divergence and top-1 agreement of artifacts against the base model.

    Base and artifacts run window by window in one pass over the same tokens.

    Examples:

      qtool eval m.Q4_K_M.gguf m.Q8_0.gguf --base ./m --dataset canterbury:plrabn12.txt --ctx 512

      qtool eval ./model-w4a16 --base ./model --dataset wiki.test.raw --ctx 2048 --chunks 20 --json

      qtool eval m.Q4_K_M.gguf --base ./m --dataset wiki.test.raw --ctx 2048 --resume m.eval-state
    """
    from qtool import api
    from qtool.evaluate.report import plot as draw_plot
    from qtool.evaluate.report import render
    from qtool.output import reporter

    out = sink(json_out)
    if plot is not None:
        check_writable(plot)
        if importlib.util.find_spec("matplotlib") is None:
            raise UnsupportedError("--plot needs matplotlib", hint="pip install matplotlib")
    with reporter(out) as rep:
        data = api.evaluate(
            artifacts,
            base=base,
            dataset=dataset,
            ctx=ctx,
            chunks=chunks,
            scoring=scoring,
            backend=backend,
            dtype=dtype,
            device=device,
            threads=threads,
            resume=resume,
            reporter=rep,
        ).data
    if plot is not None:
        draw_plot(data, plot)
        out.info(f"wrote {plot}")
    out.result(data, lambda console: render(console, data))
