"""Option aliases shared by every command, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

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
