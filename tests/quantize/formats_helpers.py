"""Helpers shared by the checkpoint-writer tests: RTN-quantize every decoder linear lazily, load
models, compare logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from qtool.checkpoint import Checkpoint, open_checkpoint
from qtool.formats.folder import ActivationQuant, WriteRequest, write_checkpoint
from qtool.grids.affine import QuantizedWeight, QuantScheme, quantize_weight

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = torch.tensor([[1, 17, 230, 5, 999, 42, 7, 311, 64, 128, 3, 900, 12, 77, 500, 2]])


def linear_modules(ckpt: Checkpoint) -> list[str]:
    return [n[: -len(".weight")] for n in ckpt.tensors if n.split(".")[-2] in PROJ]


def rtn_loaders(
    ckpt: Checkpoint, scheme: QuantScheme, edit: Callable[[QuantizedWeight], None] | None = None
) -> dict[str, Callable[[], QuantizedWeight]]:
    """module -> lazy RTN QuantizedWeight (cached, so the writer and the reference see the same
    object); ``edit`` may alter each one (e.g. set an act-order g_idx)."""
    cache: dict[str, QuantizedWeight] = {}

    def loader(m: str) -> Callable[[], QuantizedWeight]:
        def load() -> QuantizedWeight:
            if m not in cache:
                qw = quantize_weight(m, ckpt.read(f"{m}.weight").float(), scheme)
                if edit is not None:
                    edit(qw)
                cache[m] = qw
            return cache[m]

        return load

    return {m: loader(m) for m in linear_modules(ckpt)}


def write(
    src: Path,
    out: Path,
    fmt: str,
    scheme: QuantScheme,
    activations: ActivationQuant | None = None,
    edit: Callable[[QuantizedWeight], None] | None = None,
) -> tuple[dict[str, Callable[[], QuantizedWeight]], Path]:
    ckpt = open_checkpoint(str(src))
    loaders = rtn_loaders(ckpt, scheme, edit)
    write_checkpoint(
        WriteRequest(ckpt, out, fmt, scheme, loaders, activations=activations, card={"x": 1})
    )
    return loaders, out


def reference_logits(
    src: Path,
    loaders: dict[str, Callable[[], QuantizedWeight]],
    activations: ActivationQuant | None = None,
) -> torch.Tensor:
    """qtool's own dequantized model (float32) on TOKENS."""
    from transformers import AutoModelForCausalLM

    from qtool.evaluate.dequantized import apply_dequantized

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    apply_dequantized(model, loaders, activations)
    with torch.inference_mode():
        return model(TOKENS).logits[0]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(TOKENS).logits[0]
