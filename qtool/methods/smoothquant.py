"""W8A8 activations: SmoothQuant migration and static input scales from calibration statistics.

SmoothQuant (Xiao et al. 2023, eq. 4) moves the difficulty of activation outliers into the
weights: per input channel ``j`` of the linears reading one normalised input,
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; the weights become ``W diag(s)`` and the
input ``X diag(s)^-1``, which folds into the preceding norm's weight, so the float model is
unchanged. Only inputs produced by a norm can be smoothed this way (q/k/v after the input norm,
gate/up after the post-attention / pre-feed-forward norm); the others keep ``s = 1``, as in the
SmoothQuant and llm-compressor mappings for Llama-like models. The pairs are the model
family's (:attr:`qtool.models.Family.smooth_pairs`).

Static per-tensor input scales are ``max_j(max|X_j| / s_j) / 127`` (symmetric int8), read from
the per-channel absmax that ``qtool calibrate`` stores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, UnsupportedError
from qtool.observers.statsfile import CalibrationStats


@dataclass
class Smoothing:
    """Per-linear input-channel factors ``s`` and the folded norm weights."""

    factors: dict[str, torch.Tensor]  # linear module name -> s [in]
    norms: dict[str, torch.Tensor]  # norm weight tensor name -> new weight (source dtype)


def _layers_prefix(ckpt: Checkpoint) -> tuple[str, int]:
    pat = re.compile(r"^(.*\.layers)\.(\d+)\.")
    prefix, n = None, -1
    for name in ckpt.tensors:
        m = pat.match(name)
        if m:
            prefix = m.group(1)
            n = max(n, int(m.group(2)))
    if prefix is None:
        raise UnsupportedError(f"{ckpt.source}: no decoder layers found")
    return prefix, n + 1


def stats_name(stats: CalibrationStats, name: str) -> str:
    for cand in (name, name.replace("model.language_model.", "model."), "model." + name):
        if cand in stats.layers:
            return cand
    raise BadInputError(
        f"the stats file has no statistics for {name}",
        hint="run `qtool calibrate` on this model again",
    )


def smoothquant(ckpt: Checkpoint, stats: CalibrationStats, alpha: float) -> Smoothing:
    """SmoothQuant factors for every norm -> linears pair of the model, with ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"--smoothquant {alpha}: alpha must be between 0 and 1")
    from qtool.models import family_for

    family = family_for(ckpt.config)
    mapping = family.smooth_pairs
    if not mapping:  # e.g. OLMo 2: its norms follow the attention and MLP, none feeds a linear
        raise UnsupportedError(
            f"--smoothquant: no norm feeds the linears of {family.model_type}, so there is "
            "nothing to fold the factors into",
            hint="drop --smoothquant (W8A8 works without it)",
        )
    prefix, n_layers = _layers_prefix(ckpt)
    factors: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        for norm, linears in mapping:
            names = [f"{prefix}.{i}.{lin}" for lin in linears]
            act = torch.from_numpy(
                np.asarray(stats[stats_name(stats, names[0])].absmax, dtype=np.float32)
            )
            w_max = torch.zeros_like(act)
            for n in names:
                w = ckpt.read(n + ".weight").to(torch.float32)
                w_max = torch.maximum(w_max, w.abs().amax(dim=0))
            s = act.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1.0 - alpha)
            s = torch.where((act == 0) | (w_max == 0), torch.ones_like(s), s)
            for n in names:
                factors[n] = s
            norm_name = f"{prefix}.{i}.{norm}.weight"
            g = ckpt.read(norm_name)
            g32 = g.to(torch.float32)
            if family.norm_offset:
                folded = (1.0 + g32) / s - 1.0
            else:
                folded = g32 / s
            norms[norm_name] = folded.to(g.dtype)
    return Smoothing(factors, norms)


def static_input_scales(
    stats: CalibrationStats, names: list[str], smoothing: Smoothing | None
) -> dict[str, float]:
    """Per-tensor symmetric int8 input scales ``max|X / s| / 127`` for each linear."""
    scales: dict[str, float] = {}
    for n in names:
        amax = torch.from_numpy(np.asarray(stats[stats_name(stats, n)].absmax, dtype=np.float32))
        if smoothing is not None and n in smoothing.factors:
            amax = amax / smoothing.factors[n]
        scales[n] = max(float(amax.max()), 1e-8) / 127.0
    return scales
