"""A checkpoint as SmoothQuant rewrites it: the smoothed linears read ``W diag(s)`` and their
norms the folded weights, so every later stage (GPTQ's layer runner, RTN, the writers) sees the
transformed model through the ordinary ``read`` without knowing about the transform."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from qtool.checkpoint import Checkpoint


class SmoothedView(Checkpoint):
    """``base`` with ``smoothing`` (:class:`qtool.methods.smoothquant.Smoothing`) applied."""

    def __init__(self, base: Checkpoint, smoothing: Any) -> None:
        super().__init__(**{f.name: getattr(base, f.name) for f in fields(Checkpoint)})
        self.base = base
        self.smoothing = smoothing
        self._factors = {m + ".weight": s for m, s in smoothing.factors.items()}

    @property
    def hf_layout(self) -> bool:
        return self.base.hf_layout

    def read(self, name: str) -> Any:
        return self.read_rows(
            name, 0, self.tensors[name].shape[0] if self.tensors[name].shape else 1
        )

    def read_rows(self, name: str, start: int, stop: int) -> Any:
        import torch

        if name in self.smoothing.norms:
            return (
                self.smoothing.norms[name][start:stop]
                if self.tensors[name].shape
                else self.smoothing.norms[name]
            )
        t = self.base.read_rows(name, start, stop)
        s = self._factors.get(name)
        if s is None:
            return t
        return t.to(torch.float32) * s[None, :]
