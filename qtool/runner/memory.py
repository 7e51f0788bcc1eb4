"""The memory plan: what a layer-by-layer run will hold, on which device, before it starts.

Everything is computed from the checkpoint's headers and the run's options, so ``--dry-run``
prints it and a run that cannot fit is refused before any calibration work, with the option
that would make it fit. The largest items scale with the calibration tokens: the hidden states
between layers (``tokens x hidden``) and, for GPTQ, the inputs and outputs its passes keep
(``tokens x intermediate`` for the MLP's down projection, ``tokens x hidden`` for the attention
block); they go to host memory, or to disk when ``--max-memory`` says host memory cannot hold
them. One layer's weights, the Hessians of the linears being solved and one batch's activations
stay on the compute device.

The host figure is the peak of a process, measured as RSS: the process itself is measured (with
the libraries the run will import loaded first, :func:`run_rss`), the rest is derived from the
shapes and dtypes. Phases that never overlap count once, at the largest: the embedding pass or
a layer; within a GPTQ layer, collecting a Hessian or solving a linear (``_gptq_items``). The
hidden states are held once: a layer's outputs replace its inputs (GPTQ's final pass too). Not
counted: the freed memory the C allocator keeps resident within a layer (:func:`release_freed`).
"""

from __future__ import annotations

import functools
import math
import os
import sys
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


def peak_rss() -> int:
    """This process's peak resident memory since it started its program: the kernel's
    high-water mark of its memory map (``VmHWM``), which ``exec`` starts afresh. Not
    ``getrusage``'s ``ru_maxrss``, which keeps the mark of the memory the process had before
    ``exec``: a qtool started by a large Python process (a test session, a notebook, a
    benchmark that built a model) through ``vfork`` would report that process's peak as its
    own. Elsewhere (no ``/proc``): ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` in this process (None elsewhere: musl, macOS, Windows)."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed() -> None:
    """Give the whole free pages of glibc's heaps back to the system; the runner calls it
    between layers (:meth:`qtool.runner.layers.Session.loaded`), after the embedding pass and
    once the calibration text is tokenized.

    The plan counts live tensors (and matches them: the bytes in use at every layer's end are
    the same from the first layer to the last), but the RSS also holds what glibc keeps of the
    memory freed. Once a freed block has raised its mmap threshold (up to 32 MiB), the per-batch
    tensors come from its heaps, where freed blocks stay resident in holes that later ones do
    not fill: SmolLM2 GPTQ on 32 x 512 tokens ended each layer with 140-230 MiB of free heap
    resident beside 196 MiB in use. Trimmed once a layer, that slack no longer carries from
    layer to layer (RSS between layers 665-750 -> 537-538 MiB). Within a layer it stays, outside
    the plan: trimming after every pass costs a page fault per page reused (about 5% more time
    for ~30 MiB), and ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment (every block of 128
    KiB or more a mapping of its own) holds the peak to the plan plus ~50 MiB for 12x the system
    time (118 s instead of 9.5 at 32 x 512)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def run_rss(model_type: str = "") -> int:
    """:func:`current_rss` with the code every calibration run loads imported first: ``datasets``
    (the documents), transformers' tokenizers, the model's class (the skeleton) and the
    compiled loops of the Hessian sums and GPTQ's solve (numba and LLVM, ~55 MiB). A plan
    made before they are imported (at the start, or for ``--dry-run``) would miss them: at
    SmolLM2 or Llama 3.2 1B they are about 250 MiB of the process (450 MiB of 700 with torch)."""
    import contextlib
    import importlib

    with contextlib.suppress(Exception):
        importlib.import_module("qtool.kernels.columns")

    with contextlib.suppress(Exception):
        importlib.import_module("datasets")
    with contextlib.suppress(Exception):
        transformers = importlib.import_module("transformers")
        transformers.AutoTokenizer  # noqa: B018 - the lazy module imports on access
        transformers.PreTrainedTokenizerFast  # noqa: B018
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if isinstance(name, str):
            getattr(transformers, name)
    return current_rss()


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
    embed_stored_bytes: int = 0  # the embedding matrix as the checkpoint stores it
    model_type: str = ""


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
    base = run_rss(shape.model_type) if base_rss is None else base_rss
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
        fixed += _gptq_items(shape, true_sequential, compute)
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
    # the embedding pass comes before any layer: it peaks at the matrix as read (as stored)
    # and, when the compute dtype differs, its converted copy
    embed_bytes = shape.embed_params * dtype_bytes
    if shape.embed_stored_bytes and shape.embed_stored_bytes != embed_bytes:
        embed_bytes += shape.embed_stored_bytes
    layer_phase = sum(i.bytes for i in fixed if i.where == compute)

    def make(place: str) -> MemoryPlan:
        p = MemoryPlan(device, dtype, list(fixed), place, base, budget_host, budget_device)
        p.items += [Item(w, b, place if place != "device" else compute) for w, b in caches]
        if embed_bytes > layer_phase:  # the embedding pass peaks above a layer's
            p.items.append(
                Item("embedding pass above a layer's", embed_bytes - layer_phase, compute)
            )
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


def _gptq_items(shape: Shape, true_sequential: bool, compute: str) -> list[Item]:
    """What a GPTQ layer holds beside its weights, at the larger of its two peaks (they never
    overlap: an accumulator's sums are freed once its Hessian is read out).

    *Collecting* the Hessian of an input ``c`` columns wide: the accumulator's float32 batch
    sum (4 bytes an entry), its buffer of input rows (``BUFFER_ROWS x c``, float32), the exact
    float64 pair of its upper blocks (16 bytes an entry of 10 of 4 x 4 blocks,
    :class:`qtool.observers.stats.HessianAccumulator`; the Hessian is read out over the
    float32 sum) and the float64 temporaries of one of its column blocks as a batch group is
    added in (three, of at most 4 x 4 blocks; the compiled CPU fold makes none). Without
    true-sequential every linear's is collected in one pass (an upper bound: linears sharing
    an input share one).

    *Solving* a ``rows x c`` linear (:func:`qtool.methods.gptq.gptq_quantize`): its Hessian, the
    float32 weight read exactly, the solver's working copy and its int32 codes (``12 rows c``),
    and one ``c x c`` float32 matrix in whose memory the inverse's Cholesky factor is made
    (``8 c^2`` with the Hessian); then the error reports, beside the Hessian and the weight:
    the dequantized GPTQ and RTN weights, a difference and its product with ``H`` and with
    itself (``24 rows c``).
    Without true-sequential the other linears' Hessians stay too.

    The finished linears' codes (one byte a weight) wait in host memory for the layer's end."""
    from qtool.observers.stats import HessianAccumulator  # torch: imported when a plan is made

    blocks, buffer_rows = HessianAccumulator.column_blocks, HessianAccumulator.BUFFER_ROWS
    ins = shape.linear_inputs
    c_collect = max(ins)
    block = c_collect // blocks(c_collect)
    fold = 24 * block * block

    def collecting(c: int) -> int:  # the float32 sum, the row buffer, the float64 pair
        n = blocks(c)
        return 4 * c * c + 4 * buffer_rows * c + 16 * (c * c * (n + 1) // (2 * n))

    if true_sequential:
        collect, others = collecting(c_collect) + fold, 0
    else:
        collect, others = sum(map(collecting, ins)) + fold, 4 * sum(i * i for i in ins)
    solve, worst = 0, shape.linear_shapes[0]
    for rows, cols in shape.linear_shapes:
        here = max(8 * cols * cols + 12 * rows * cols, 4 * cols * cols + 24 * rows * cols)
        here += others - 4 * cols * cols if others else 0
        if here > solve:
            solve, worst = here, (rows, cols)
    if collect >= solve:
        stage = Item(f"GPTQ: collecting a {c_collect}-column Hessian", collect, compute)
    else:
        stage = Item(f"GPTQ: solving a {worst[0]}x{worst[1]} linear", solve, compute)
    return [stage, Item("GPTQ: the layer's finished codes", shape.layer_params, "host")]


def shape_of(ckpt: Any) -> Shape:
    """The plan's numbers from a checkpoint's config and tensor headers."""
    from qtool.models import family_for
    from qtool.models.spec import ModelSpec

    spec = ModelSpec.from_config(ckpt.config)
    family = family_for(ckpt.config, strict=False)
    layer_params: dict[int, int] = {}
    embed = embed_stored = 0
    inputs: list[int] = []
    shapes: list[tuple[int, int]] = []
    for name, info in ckpt.tensors.items():
        i = family.layer_index(name)
        if i is None:
            if "embed" in name and info.numel > embed:
                embed, embed_stored = info.numel, info.nbytes
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
        embed_stored_bytes=embed_stored,
        model_type=str(ckpt.config.get("model_type", "")),
    )
