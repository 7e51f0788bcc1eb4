"""Decode a GGUF file's tensors exactly into a Hugging Face architecture's state dict.

The block bytes go through qtool's codecs (``qtool.kernels.dequantize``, bit-exact with
llama.cpp's ``to_float``), then the layout changes llama.cpp's converter made are undone by the
model family (:meth:`qtool.models.Family.from_gguf`: Llama's Q/K row permutation, Gemma's
``w + 1`` norms), so that the float weights are those llama.cpp multiplies with. Names are
mapped by inverting the family's HF -> llama.cpp names over the target model's own names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from qtool.checkpoint import Checkpoint
from qtool.errors import UnsupportedError
from qtool.gguf_meta import read_gguf_tensor
from qtool.models import Family, family_for

# GGUF tensors llama.cpp computes with that have no HF weight: HF derives them from the config.
RUNTIME_ONLY = ("rope_freqs.weight",)


def gguf_to_hf_names(ckpt: Checkpoint, hf_names: Iterable[str], family: Family) -> dict[str, str]:
    """{GGUF tensor name: HF name} for every GGUF tensor; fails on a tensor the HF
    architecture has no place for."""
    inverse = family.hf_names(list(hf_names))
    model_type, n_layers = family.model_type, family.n_layers
    out: dict[str, str] = {}
    for g in ckpt.tensors:
        if g in RUNTIME_ONLY:
            continue
        if g not in inverse:
            raise UnsupportedError(
                f"{ckpt.source}: GGUF tensor {g} has no counterpart in the base architecture "
                f"({model_type}, {n_layers} layers)",
                hint="pass the --base model this GGUF was converted from",
            )
        out[g] = inverse[g]
    return out


def decode_state_dict(
    ckpt: Checkpoint,
    expected: dict[str, tuple[int, ...]],
    config: dict[str, Any],
    *,
    dtype: Any,
    tied: bool,
) -> dict[str, Any]:
    """Decode every tensor of a GGUF ``ckpt`` into HF names and layout.

    ``expected``: the target model's {HF name: shape}. ``config``: its HF config dict
    (model_type, heads). ``tied``: whether the output projection is the embedding (no
    ``output.weight`` in the file), in which case ``lm_head.weight`` is not expected.
    Returns {HF name: torch tensor of ``dtype``}.
    """
    import torch

    try:
        family = family_for(config)
    except UnsupportedError as e:
        raise UnsupportedError(
            f"{ckpt.source}: decoding GGUF into this architecture is not supported ({e.message})",
            hint="use --backend llama.cpp to evaluate the file through llama.cpp",
        ) from e
    names = gguf_to_hf_names(ckpt, expected, family)
    wanted = {k for k in expected if not (tied and k == "lm_head.weight")}
    missing = sorted(wanted - set(names.values()))
    if missing:
        raise UnsupportedError(
            f"{ckpt.source}: the GGUF file has no tensor for {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="pass the --base model this GGUF was converted from",
        )
    out: dict[str, Any] = {}
    for g, hf in names.items():
        w = family.from_gguf(hf, read_gguf_tensor(ckpt, g)).astype(np.float32, copy=False)
        if tuple(w.shape) != tuple(expected[hf]):
            raise UnsupportedError(
                f"{ckpt.source}: GGUF tensor {g} has shape {tuple(w.shape)}, the base model's "
                f"{hf} has {tuple(expected[hf])}",
                hint="pass the --base model this GGUF was converted from",
            )
        out[hf] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    return out
