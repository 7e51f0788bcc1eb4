"""The memory plan: what a layer-by-layer run will hold, on which device, before it starts.

Everything is computed from the checkpoint's headers and the run's options, so ``--dry-run``
prints it and a run that cannot fit is refused before any calibration work, with the option
that would make it fit. The largest items scale with the calibration tokens: the hidden states
between layers (``tokens x hidden``) and, for GPTQ, the inputs and outputs its passes keep
(``tokens x intermediate`` for the MLP's down projection, ``tokens x hidden`` for the attention
block); they go to host memory, or to disk when ``--max-memory`` says host memory cannot hold
them. One layer's weights, the Hessians of the linears being solved and one batch's activations
stay on the compute device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from qtool.errors import BadInputError

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": GIB, "gb": GIB, "gib": GIB,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}  # fmt: skip


def parse_bytes(text: str | int | None, flag: str = "--max-memory") -> int | None:
    """``"12GiB"``, ``"512M"``, ``"2e9"`` -> bytes (binary units for K/M/G/T)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise BadInputError(f"{flag} {text!r}: not a size", hint="e.g. 16GiB, 512MiB")
    return int(value * _UNITS[unit])


def current_rss() -> int:
    """This process's resident memory now (the fixed part of the plan: torch, code, buffers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Shape:
    """The numbers the plan needs, from config and headers."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    layer_params: int  # the largest decoder layer's parameters
    embed_params: int
    linear_inputs: list[int]  # input widths of one layer's linears (Hessian sizes)
    linear_shapes: list[tuple[int, int]]


@dataclass
class Item:
    what: str
    bytes: int
    where: str  # "device", "host" or "disk"


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    items: list[Item] = field(default_factory=list)
    placement: str = "host"  # where the per-batch caches go: device, host or disk
    base_rss: int = 0
    budget_host: int | None = None
    budget_device: int | None = None

    def total(self, where: str) -> int:
        return sum(i.bytes for i in self.items if i.where == where)

    @property
    def host_peak(self) -> int:
        return (
            self.base_rss
            + self.total("host")
            + (self.total("device") if self.device == "cpu" else 0)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "placement": self.placement,
            "items": [i.__dict__ for i in self.items],
            "host_bytes": self.host_peak,
            "device_bytes": self.total("device") if self.device != "cpu" else 0,
            "disk_bytes": self.total("disk"),
            "budget_host": self.budget_host,
            "budget_device": self.budget_device,
            "base_rss": self.base_rss,
        }

    def lines(self) -> list[str]:
        out = [
            f"memory plan ({self.device}, {self.dtype}; per-batch caches on {self.placement}): "
            f"host {self.host_peak / GIB:.2f} GiB"
            + (f" of {self.budget_host / GIB:.2f}" if self.budget_host else "")
            + (
                f", device {self.total('device') / GIB:.2f} GiB"
                + (f" of {self.budget_device / GIB:.2f}" if self.budget_device else "")
                if self.device != "cpu"
                else ""
            )
            + (f", disk {self.total('disk') / GIB:.2f} GiB" if self.total("disk") else "")
        ]
        for i in self.items:
            out.append(f"  {i.what}: {i.bytes / 2**20:,.1f} MiB on {i.where}")
        return out


def plan_memory(
    shape: Shape,
    *,
    tokens: int,
    batch_tokens: int,
    seq_len: int,
    dtype_bytes: int,
    dtype: str,
    device: str,
    gptq: bool,
    true_sequential: bool = True,
    budget_host: int | None = None,
    budget_device: int | None = None,
    base_rss: int | None = None,
) -> MemoryPlan:
    """Place the per-batch caches (device, host, disk) so the run fits the budgets; raise a
    :class:`BadInputError` naming the option that would make it fit when nothing does."""
    on_gpu = device != "cpu"
    compute = "device" if on_gpu else "host"
    base = current_rss() if base_rss is None else base_rss
    fixed = [
        Item("one layer's weights", shape.layer_params * dtype_bytes, compute),
        Item(
            "one batch's activations",
            batch_tokens * (6 * shape.hidden + 3 * shape.intermediate) * 4
            + (batch_tokens // max(1, seq_len)) * shape.heads * seq_len * seq_len * 4,
            compute,
        ),
    ]
    if gptq:
        # the Hessians of one stage (true-sequential: one input group; else the whole layer):
        # 20 bytes an entry (the batch group's float32 sum and the exact float64 pair, see
        # qtool.calibrate.stats.HessianAccumulator); the solver's float32 copies of the largest
        # weight and of H^-1
        ins = shape.linear_inputs
        hess = max(ins) ** 2 * 20 if true_sequential else sum(i**2 * 20 for i in set(ins)) * 2
        rows, cols = max(shape.linear_shapes, key=lambda rc: rc[0] * rc[1])
        fixed.append(Item("Hessians being collected", hess, compute))
        fixed.append(
            Item("GPTQ solver (W, H^-1, codes)", rows * cols * 12 + cols * cols * 8, compute)
        )
    else:
        fixed.append(
            Item("statistics accumulators", sum(ins * 64 for ins in shape.linear_inputs), compute)
        )
    caches = [("hidden states between layers", tokens * shape.hidden * dtype_bytes)]
    if gptq:
        caches += [
            ("GPTQ: a tail linear's saved inputs", tokens * shape.intermediate * dtype_bytes),
            ("GPTQ: finished modules' outputs", tokens * shape.hidden * dtype_bytes),
        ]
    embed = Item("embedding matrix (first pass only)", shape.embed_params * dtype_bytes, compute)

    def make(place: str) -> MemoryPlan:
        p = MemoryPlan(device, dtype, list(fixed), place, base, budget_host, budget_device)
        p.items += [Item(w, b, place if place != "device" else compute) for w, b in caches]
        if embed.bytes > fixed[0].bytes:  # the embedding pass peaks above one layer
            p.items.append(Item("embedding above one layer", embed.bytes - fixed[0].bytes, compute))
        return p

    choices = (["device"] if on_gpu else []) + ["host", "disk"]
    for place in choices:
        p = make(place)
        host_ok = budget_host is None or p.host_peak <= budget_host
        dev_ok = not on_gpu or budget_device is None or p.total("device") <= budget_device
        if host_ok and dev_ok:
            return p
    p = make("disk")
    need_host, need_dev = p.host_peak, p.total("device")
    if budget_host is not None and need_host > budget_host:
        raise BadInputError(
            f"the run needs {need_host / GIB:.2f} GiB of host memory even with its caches on "
            f"disk, over --max-memory {budget_host / GIB:.2f} GiB (one layer's weights "
            f"{fixed[0].bytes / GIB:.2f} GiB, the process itself {base / GIB:.2f} GiB)",
            hint=f"raise --max-memory to at least {math.ceil(need_host / GIB * 10) / 10} GiB, "
            "or use a smaller --batch-size"
            + (" or --compute-dtype bfloat16" if dtype_bytes > 2 else ""),
        )
    raise BadInputError(
        f"the run needs {need_dev / GIB:.2f} GiB on {device}, over --max-gpu-memory "
        f"{(budget_device or 0) / GIB:.2f} GiB",
        hint="raise --max-gpu-memory, use a smaller --batch-size, or --compute-dtype bfloat16",
    )


def shape_of(ckpt: Any) -> Shape:
    """The plan's numbers from a checkpoint's config and tensor headers."""
    from qtool.models import family_for
    from qtool.models.spec import ModelSpec

    spec = ModelSpec.from_config(ckpt.config)
    family = family_for(ckpt.config, strict=False)
    layer_params: dict[int, int] = {}
    embed = 0
    inputs: list[int] = []
    shapes: list[tuple[int, int]] = []
    for name, info in ckpt.tensors.items():
        i = family.layer_index(name)
        if i is None:
            if "embed" in name:
                embed = max(embed, info.numel)
            continue
        layer_params[i] = layer_params.get(i, 0) + info.numel
        if i == 0 and family.is_linear(name, tuple(info.shape)):
            inputs.append(int(info.shape[1]))
            shapes.append((int(info.shape[0]), int(info.shape[1])))
    return Shape(
        layers=spec.n_layers,
        hidden=spec.hidden,
        intermediate=int(spec.intermediate or 4 * spec.hidden),
        heads=spec.n_heads,
        vocab=int(spec.vocab or 0),
        layer_params=max(layer_params.values(), default=0),
        embed_params=embed,
        linear_inputs=inputs or [spec.hidden],
        linear_shapes=shapes or [(spec.hidden, spec.hidden)],
    )
