"""GPTQ over a whole model: one decoder layer in memory at a time, the quantized outputs of
layer ``i`` feeding layer ``i + 1``, and a checkpoint after every layer (``--resume``).

Each linear is quantized on the grid (or grids: one calibration pass can feed several outputs)
it is given; linears given none stay as they are. Within a layer the linear modules are grouped
by the input they read (found by running the layer once: q/k/v share one input, gate/up
another, in the order the forward calls them). With *true-sequential* quantization each group's
Hessian is collected with the earlier groups already quantized (AutoGPTQ ``true_sequential``);
otherwise all groups see the float layer. When a linear is quantized on several grids (several
outputs), the float weights propagate (there is no single quantized model to feed forward).

A pass over the calibration samples collects one group's inputs and stops the forward there
(an exception from the first hook of the group), so nothing after it runs. Modules whose
linears are all quantized are *frozen*: their outputs cannot change any more, so the outermost
ones record their outputs the first time they run and return them in the later passes instead
of recomputing (the attention block runs once with its quantized q/k/v, for example). Every
linear and the attention thus run once per layer. A norm whose readers all replay their outputs
is skipped too (the family's norm -> linears pairs say who reads it); what still repeats is the
residual additions and the like. The final pass computes the layer's output, which becomes the
next layer's input.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtool import __version__
from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, QToolError
from qtool.events import SILENT, Reporter
from qtool.grids.base import Grid, QuantizedTensor
from qtool.methods.gptq import GPTQConfig, GPTQResult, gptq_quantize
from qtool.observers.stats import HessianAccumulator
from qtool.observers.statsfile import model_identity
from qtool.runner.dist import World, assign, die_here
from qtool.runner.layers import DTYPES, Session, pick_device
from qtool.runner.memory import peak_rss, release_freed
from qtool.runner.moe import MIN_EXPERT_TOKENS, moe_blocks, set_all_experts, take_routed
from qtool.runner.stash import Stash
from qtool.runner.workdir import WorkFolder, checkpoint_every


class _StopLayer(Exception):
    """Raised by a hook once the inputs a pass collects have been seen."""


@dataclass
class SequentialOptions:
    """What the layer-by-layer GPTQ run needs besides the model, the samples and the grids."""

    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    true_sequential: bool = True
    batch_size: int = 1
    device: str = "auto"
    compute_dtype: str = "float32"  # the forward passes' (resolved: never "auto" here)
    cache_outputs: bool = True  # reuse frozen modules' outputs (off only to test that it is exact)
    input_absmax: bool = False  # record each linear's input max |x| (static activation scales)
    all_experts: bool = False  # MoE: every token through every expert (Hessians for all)
    place: str = "device"  # where per-batch caches live: device, host, disk (the memory plan)
    checkpoint_every: int | None = None  # layers between hidden-state checkpoints (None: sized)

    def to_json(self) -> dict[str, Any]:
        return {
            "gptq": self.gptq.to_json(),
            "true_sequential": self.true_sequential,
            "batch_size": self.batch_size,
            "compute_dtype": self.compute_dtype,
            "input_absmax": self.input_absmax,
            **({"all_experts": True} if self.all_experts else {}),
        }


@dataclass
class LinearReport:
    """How well one linear was reconstructed on its calibration inputs: ``||(W - Q) X|| /
    ||W X||`` for GPTQ and for plain RTN on the same grid (computed from the Hessian)."""

    name: str
    grid: str
    gptq_rel_error: float
    rtn_rel_error: float
    damp: float
    input_absmax: float | None
    method: str = "gptq"  # "rtn": a MoE expert with too few tokens (see qtool.runner.moe)
    tokens: int | None = None


# -- the resume directory -------------------------------------------------------------------------


def _key(name: str, grid: str) -> str:
    return f"{name}@{grid}"


class WorkDir(WorkFolder):
    """GPTQ's resume folder: each finished layer's quantized weights (every grid), the reports,
    and the hidden-state checkpoints (:class:`~qtool.runner.workdir.WorkFolder`; under
    torchrun rank 0 keeps it for every rank)."""

    kind = "GPTQ"

    def save_layer(
        self,
        i: int,
        weights: list[tuple[str, QuantizedTensor]],
        reports: list[LinearReport],
        hidden: Stash | None,
    ) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for grid_key, w in weights:
            for field_name, t in w.state().items():
                tensors[f"{_key(w.name, grid_key)}.{field_name}"] = t
        self.save(i, tensors, [r.__dict__ for r in reports], hidden)

    def shared_weights(
        self, layers: range, grids: dict[str, Grid]
    ) -> dict[tuple[str, str], Callable[[], QuantizedTensor]]:
        """The saved codes of ``layers`` on every rank (rank 0 reads the files, the others get
        their bytes): what a resumed run needs to recompute those layers' outputs."""
        if not self.world.active:
            return self.weights(layers.stop, grids)
        out: dict[tuple[str, str], Callable[[], QuantizedTensor]] = {}
        for i in layers:
            tensors = self.shared_tensors(i)
            for k in sorted({k.rsplit(".", 1)[0] for k in tensors}):
                name, grid_key = k.rsplit("@", 1)
                state = {
                    f.removeprefix(k + "."): t for f, t in tensors.items() if f.startswith(k + ".")
                }
                out[(name, grid_key)] = _restorer(grids[grid_key], name, state)
        return out

    def weights(
        self, n_layers: int, grids: dict[str, Grid]
    ) -> dict[tuple[str, str], Callable[[], QuantizedTensor]]:
        """Lazy loaders of every quantized weight, by (module name, grid key)."""
        from safetensors import safe_open

        out: dict[tuple[str, str], Callable[[], QuantizedTensor]] = {}
        for i in range(n_layers):
            path = self.layer_file(i)
            with safe_open(str(path), "pt") as f:
                keys = sorted({k.rsplit(".", 1)[0] for k in f.keys()})  # noqa: SIM118
            for k in keys:
                name, grid_key = k.rsplit("@", 1)
                out[(name, grid_key)] = _loader(path, name, grids[grid_key])
        return out


def _restorer(
    grid: Grid, name: str, state: dict[str, torch.Tensor]
) -> Callable[[], QuantizedTensor]:
    return lambda: grid.restore(name, state)


def _loader(path: Path, name: str, grid: Grid) -> Callable[[], QuantizedTensor]:
    def load() -> QuantizedTensor:
        from safetensors import safe_open

        prefix = _key(name, grid.key) + "."
        with safe_open(str(path), "pt") as f:
            state = {
                k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)
            }
        return grid.restore(name, state)

    return load


def run_identity(
    ckpt: Checkpoint, ids: torch.Tensor, opts: SequentialOptions, grids: dict[str, list[Grid]]
) -> dict[str, Any]:
    """What makes two runs the same run: model, samples, options, grids, qtool version."""
    ids32 = ids.to(torch.int32).contiguous().numpy().tobytes()
    by_grid: dict[str, int] = {}
    for gs in grids.values():
        for g in gs:
            by_grid[g.key] = by_grid.get(g.key, 0) + 1
    return {
        "model": model_identity(ckpt),
        "samples": {
            "shape": list(ids.shape),
            "tokens_sha256": hashlib.sha256(ids32).hexdigest(),
        },
        "options": opts.to_json(),
        "grids": {
            "linears": len(grids),
            "per_grid": dict(sorted(by_grid.items())),
            "sha256": hashlib.sha256(
                json.dumps({k: [g.key for g in v] for k, v in sorted(grids.items())}).encode()
            ).hexdigest(),
        },
        "qtool_version": __version__,
    }


class _Outputs:
    """A module's recorded outputs, one per batch: the tensor in a :class:`Stash` (placed by
    the memory plan) and the tuple shape around it (an attention block returns ``(out, None)``;
    the extra items its caller discards are not kept)."""

    def __init__(self, stash: Stash) -> None:
        self.stash = stash
        self.size: int | None = None

    def __len__(self) -> int:
        return len(self.stash)

    def add(self, out: Any) -> None:
        if isinstance(out, tuple):
            self.size = len(out)
            out = out[0]
        self.stash.append(out)

    def __getitem__(self, j: int) -> Any:
        t = self.stash[j]
        return t if self.size is None else (t, *([None] * (self.size - 1)))

    def close(self) -> None:
        self.stash.close()


@dataclass
class LayerPlan:
    """What one run of a layer shows: its linears grouped by input, and the *tail* modules,
    whose output is the output of one of their own linears (the attention block returns
    ``o_proj(...)``, the MLP ``down_proj(...)``): once that linear is quantized, such a module's
    output is the linear applied to its recorded input, with nothing before it recomputed."""

    groups: list[list[str]]
    tails: dict[str, tuple[str, int | None]]  # module -> (its tail linear, tuple length or None)


def discover(
    layer: nn.Module, linears: dict[str, nn.Linear], run_once: Callable[[], Any]
) -> LayerPlan:
    """Run ``layer`` once and read its structure: input groups (in call order) and tails."""
    seen: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their identity unique
    lin_out: list[tuple[str, torch.Tensor]] = []
    mod_out: list[tuple[str, Any]] = []
    hooks = []
    for n, m in linears.items():
        hooks.append(m.register_forward_pre_hook(lambda _m, a, n=n: seen.append((n, a[0]))))
        hooks.append(m.register_forward_hook(lambda _m, _a, o, n=n: lin_out.append((n, o))))
    for n, m in layer.named_modules():
        if n and n not in linears and any(ln.startswith(n + ".") for ln in linears):
            hooks.append(m.register_forward_hook(lambda _m, _a, o, n=n: mod_out.append((n, o))))
    try:
        with torch.no_grad():
            run_once()
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        for inp, members in groups:
            if inp is x:
                if name not in members:
                    members.append(name)
                break
        else:
            if not any(name in m for _, m in groups):
                groups.append((x, [name]))
    missing = set(linears) - {n for _, m in groups for n in m}
    if missing:
        raise QToolError(f"linear layers never called by the forward: {sorted(missing)}")
    tails: dict[str, tuple[str, int | None]] = {}
    for n, out in mod_out:
        first, size = out, None
        if isinstance(out, tuple):
            if not out or any(o is not None for o in out[1:]):
                continue
            first, size = out[0], len(out)
        for ln, lo in lin_out:
            if lo is first and ln.startswith(n + "."):
                tails[n] = (ln, size)
    return LayerPlan([m for _, m in groups], tails)


class _LayerPasses:
    """Runs one decoder layer over every batch, with input-collecting hooks, an early stop and
    the frozen-module output cache described in the module docstring."""

    def __init__(
        self,
        layer: nn.Module,
        linears: dict[str, nn.Linear],
        hidden: Stash,
        args: list[tuple[tuple[Any, ...], dict[str, Any]]],
        stash: Callable[[str], Stash],
        cache_outputs: bool,
        tails: dict[str, tuple[str, int | None]] | None = None,
        norm_feeds: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.layer = layer
        self.tails: dict[str, tuple[str, int | None]] = (tails or {}) if cache_outputs else {}
        self.tail_linears = {ln for ln, _ in (tails or {}).values()}
        self.saved: dict[str, Stash] = {}  # tail linear -> its inputs, per batch
        self.linears = linears
        self.hidden = hidden
        self.args = args
        self.stash = stash  # makes a new per-batch store (device, host or disk, as planned)
        self.cache_outputs = cache_outputs
        self.cache: dict[str, _Outputs] = {}
        self.modules = {n: m for n, m in layer.named_modules() if n}
        # norm -> the linears that alone read its output (the family's SmoothQuant pairs, which
        # SmoothQuant needs complete too; none for an architecture without a family): a pass
        # where all of them sit under modules replaying their outputs skips the norm
        self.norm_feeds = {
            n: lins
            for n, lins in (norm_feeds or {}).items()
            if lins and all(x in self.modules for x in (n, *lins))
        }
        self.optional: set[str] = set()  # MoE experts: a batch may route no token to them
        self.lin_under = {
            n: {ln for ln in linears if ln == n or ln.startswith(n + ".")} for n in self.modules
        }

    def close(self) -> None:
        for c in self.cache.values():
            c.close()
        for st in self.saved.values():
            st.close()
        self.cache, self.saved = {}, {}

    def _frozen(self, quantized: set[str]) -> list[str]:
        return [n for n, lins in self.lin_under.items() if lins and lins <= quantized]

    def run(
        self,
        quantized: set[str],
        collect: dict[str, HessianAccumulator] | None,
        on_batch: Callable[[], None],
        out: Stash | None = None,
        group_end: list[bool] | None = None,
    ) -> None:
        """One pass. ``collect`` maps the first linear of each group to collect to its
        accumulator (the pass stops once all have been seen); ``None``: the full forward, whose
        outputs go to ``out``. ``group_end[j]``: batch ``j`` closes a group of batches, whose
        sums the accumulators then add exactly into their totals."""

        def batch_done(j: int) -> None:
            if collect is not None and group_end is not None and group_end[j]:
                for acc in collect.values():
                    acc.end_group()
            on_batch()

        frozen = set(self._frozen(quantized)) if self.cache_outputs else set()
        maximal = {n for n in frozen if "." not in n or n.rsplit(".", 1)[0] not in frozen}
        # a module whose parent's tail input is being recorded now is not needed afterwards:
        # the parent is computed from that input in the next pass (q/k/v under the attention)
        saving = set(collect or ()) & self.tail_linears
        skip = {
            n
            for n in maximal
            if "." in n and self.tails.get(n.rsplit(".", 1)[0], ("",))[0] in saving
        }
        record: dict[str, _Outputs] = {
            n: _Outputs(self.stash(f"out-{n}"))
            for n in maximal
            if n not in self.cache and n not in skip
        }
        j_now = [0]
        patched, hooks = [], []
        replayed: list[str] = []  # modules whose forward ignores its input in this pass
        used: set[str] = set()
        for n in frozen:
            mod = self.modules[n]
            if n in self.cache:
                entries = self.cache[n]
                object.__setattr__(mod, "forward", lambda *a, _e=entries, **k: _e[j_now[0]])
                patched.append(mod)
                replayed.append(n)
            elif n in self.tails and len(self.saved.get(self.tails[n][0], ())) == len(self.hidden):
                lname, size = self.tails[n]
                object.__setattr__(mod, "forward", self._tail_forward(lname, size, j_now))
                patched.append(mod)
                replayed.append(n)
                used.add(lname)
        for norm, lins in self.norm_feeds.items():
            # nothing reads this norm's output now: its input stands in for it (same shape and
            # dtype), unread. In a Llama layer, 4 of the 8 norm calls of a layer's passes
            if all(any(x == r or x.startswith(r + ".") for r in replayed) for x in lins):
                mod = self.modules[norm]
                object.__setattr__(mod, "forward", lambda x, *a, **k: x)
                patched.append(mod)
        for n, store in record.items():
            hooks.append(
                self.modules[n].register_forward_hook(lambda _m, _a, y, _s=store: _s.add(y))
            )
        pending: set[str] = set()
        if collect is not None:
            for lname, acc in collect.items():
                keep = None
                if lname in self.tail_linears:
                    keep = self.saved.setdefault(lname, self.stash(f"in-{lname}"))

                def pre(
                    _m: nn.Module, a: tuple[Any, ...], _n: str = lname, _acc=acc, _keep=keep
                ) -> None:
                    _acc.add(a[0])
                    if _keep is not None:
                        _keep.append(a[0].detach())
                    pending.discard(_n)
                    if not pending:
                        raise _StopLayer

                hooks.append(self.linears[lname].register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                for j in range(len(self.hidden)):
                    j_now[0] = j
                    pending.clear()
                    pending.update(collect or ())
                    args, kwargs = self.args[j]
                    try:
                        y = self.layer(self.hidden[j], *args, **kwargs)
                    except _StopLayer:
                        batch_done(j)
                        continue
                    if collect is not None:
                        if pending <= self.optional:  # experts no token of this batch reached
                            batch_done(j)
                            continue
                        raise QToolError("a GPTQ pass ended without reaching its linear layers")
                    assert out is not None
                    out[j] = y[0] if isinstance(y, (tuple, list)) else y
                    batch_done(j)
        finally:
            for mod in patched:
                del mod.forward
            for hk in hooks:
                hk.remove()
        # keep what the next pass can use: outputs of the outermost frozen modules, recorded
        # for every batch (a module the early stop cut off is recomputed instead)
        for lname in used:
            self.saved.pop(lname).close()
        done = {n: r for n, r in record.items() if len(r) == len(self.hidden)}
        for n, r in record.items():
            if n not in done:
                r.close()
        kept = {
            n: self.cache[n] if n in self.cache else done[n]
            for n in maximal
            if n in self.cache or n in done
        }
        for n, c in self.cache.items():
            if n not in kept:
                c.close()
        self.cache = kept

    def _tail_forward(self, lname: str, size: int | None, j_now: list[int]) -> Callable[..., Any]:
        linear, saved = self.linears[lname], self.saved[lname]

        def forward(*_a: Any, **_k: Any) -> Any:
            y = linear(saved[j_now[0]])
            return y if size is None else (y, *([None] * (size - 1)))

        return forward


# -- the model -------------------------------------------------------------------------------------


@dataclass
class SequentialResult:
    weights: dict[tuple[str, str], Callable[[], QuantizedTensor]]  # (module, grid key) -> loader
    reports: list[dict[str, Any]]
    seconds: float
    resumed_from: int
    device: str
    compute_dtype: str = "float32"
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0


def _hessian_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """``||D X||^2`` up to the factor ``n/2``: ``sum((D H) * D)``."""
    return float(((d @ h) * d).sum().clamp_min(0))


def gptq_model(
    ckpt: Checkpoint,
    ids: torch.Tensor,
    grids: dict[str, list[Grid]],
    opts: SequentialOptions,
    work: WorkDir,
    *,
    reporter: Reporter = SILENT,
) -> SequentialResult:
    """Quantize with GPTQ every decoder linear named in ``grids`` (module name -> the grids to
    quantize it on) layer by layer on the token ``ids``. Under torchrun (``work.world``) each
    rank runs the forwards of its shard of the samples, the Hessians are summed exactly over the
    ranks, and each stage's linears are solved on different ranks: every rank ends with the
    single-process run's codes; rank 0 keeps the work directory."""
    t0 = time.perf_counter()
    world = work.world
    device = pick_device(opts.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # reproducible, as the reference code
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = DTYPES[opts.compute_dtype]
    session = Session(
        ckpt,
        ids,
        device=device,
        dtype=dtype,
        batch_size=opts.batch_size,
        place=opts.place,
        folder=work.stash_folder() if opts.place == "disk" else None,
        reporter=reporter,
        world=world,
    )
    try:
        return _gptq_session(session, grids, opts, work, reporter, t0)
    finally:
        session.close()


def _gptq_session(
    session: Session,
    grids: dict[str, list[Grid]],
    opts: SequentialOptions,
    work: WorkDir,
    reporter: Reporter,
    t0: float,
) -> SequentialResult:
    n_layers = session.n_layers
    total = n_layers + 1
    propagate = all(len(g) == 1 for g in grids.values())
    all_grids = {g.key: g for gs in grids.values() for g in gs}
    every = checkpoint_every(session, opts.checkpoint_every)
    session.embed(total)
    start = work.layers_done
    world = session.world
    if start:
        reporter.info(f"resuming at layer {start} of {n_layers} from {work.path}")
        if work.hidden_at:
            work.load_hidden(session.hidden, session.shards())
        saved = work.shared_weights(range(work.hidden_at, start), all_grids) if propagate else {}
        for i in range(work.hidden_at, start):  # recompute from the last hidden checkpoint
            s0 = time.perf_counter()
            reporter.stage(f"layer {i} (recomputed)", i + 1, total, len(session.batches))
            with session.loaded(i) as layer:
                if propagate:
                    _put_quantized(layer, session.prefix(i), grids, saved)
                session.forward(layer, i)
            reporter.stage_done(f"layer {i} (recomputed)", time.perf_counter() - s0)

    for i in range(start, n_layers):
        s0 = time.perf_counter()
        die_here(i)
        with session.loaded(i) as layer:
            set_all_experts(layer, opts.all_experts)
            weights, reports = _quantize_layer(
                session, layer, i, grids, opts, reporter, total, propagate
            )
        last = i + 1 == n_layers
        checkpoint = not last and ((i + 1) % every == 0)
        work.save_layer(i, weights, reports, session.hidden if checkpoint else None)
        # saved (read back lazily at the end): not held through the next layer, whose peak
        # they raised by their size (8B widths: 208 MiB of codes)
        del weights, reports
        release_freed()
        reporter.stage_done(f"layer {i}", time.perf_counter() - s0)

    device = session.device
    peak_dev = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    return SequentialResult(
        weights=work.weights(n_layers, all_grids) if world.is_main else {},
        reports=work.reports,
        seconds=time.perf_counter() - t0,
        resumed_from=start,
        device=str(device),
        compute_dtype=opts.compute_dtype,
        peak_host_bytes=peak_rss(),
        peak_device_bytes=peak_dev,
    )


def _put_quantized(
    layer: nn.Module,
    prefix: str,
    grids: dict[str, list[Grid]],
    saved: dict[tuple[str, str], Callable[[], QuantizedTensor]],
) -> None:
    """A finished layer's linears set to their quantized values (to recompute its outputs)."""
    for n, m in layer.named_modules():
        full = prefix + n
        if isinstance(m, nn.Linear) and full in grids:
            q = saved[(full, grids[full][0].key)]()
            m.weight.data = q.dequantize().to(m.weight.device, m.weight.dtype)


def _exact_weight(session: Session, full: str, lin: nn.Linear) -> torch.Tensor:
    """The linear's weight as GPTQ solves for it: the checkpoint's own values in float32 (the
    module holds them in the compute dtype, which may have rounded them)."""
    if session.dtype == torch.float32:
        return lin.weight.detach().to(torch.float32)
    return session.loader.read(full + ".weight").to(device=session.device, dtype=torch.float32)


def _quantize_layer(
    session: Session,
    layer: nn.Module,
    index: int,
    grids: dict[str, list[Grid]],
    opts: SequentialOptions,
    reporter: Reporter,
    total: int,
    propagate: bool,
) -> tuple[list[tuple[str, QuantizedTensor]], list[LinearReport]]:
    prefix = session.prefix(index)
    device = session.device
    hidden = session.hidden
    args = session.args(index)
    all_linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    # the linears GPTQ quantizes here; the others run as they are
    linears = {n: m for n, m in all_linears.items() if prefix + n in grids}
    for n, m in linears.items():
        for grid in grids[prefix + n]:
            grid.check(prefix + n, tuple(m.weight.shape))
    for n, p in layer.named_parameters():
        if not torch.isfinite(p).all():
            raise BadInputError(
                f"{prefix}{n}: {int((~torch.isfinite(p)).sum())} weight(s) are NaN or infinite",
                hint="the checkpoint is damaged",
            )

    def once() -> Any:
        a, k = args[0]
        return layer(hidden[0], *a, **k)

    def once_every_expert() -> Any:  # discovery must see every expert called
        all_on = any(b.all_experts for b in moe_blocks(layer))
        set_all_experts(layer, True)
        try:
            return once()
        finally:
            set_all_experts(layer, all_on)

    if not linears:
        reporter.stage(f"layer {index}", index + 1, total, len(session.batches))
        session.forward(layer, index)
        return [], []

    plan = discover(layer, linears, once_every_expert)
    groups = plan.groups
    sequential = opts.true_sequential and propagate
    experts = {n for n in linears if _expert_role(n)}
    stages = _merge_expert_stages(groups) if sequential else [[n for g in groups for n in g]]
    # a tail linear's recorded input is final only if every earlier group was quantized when it
    # was recorded: true-sequential runs only
    tails = plan.tails if sequential else {}
    cache = opts.cache_outputs and propagate
    norm_feeds = dict(session.family.smooth_pairs)  # who reads each norm's output
    passes = _LayerPasses(layer, linears, hidden, args, session.stash, cache, tails, norm_feeds)
    passes.optional = experts
    n_passes = len(stages) + 1
    reporter.stage(f"layer {index}", index + 1, total, n_passes * len(session.batches))

    world = session.world
    quantized: set[str] = set()
    results: list[tuple[str, QuantizedTensor]] = []
    reports: list[LinearReport] = []
    try:
        for stage in stages:
            stage_groups = [g for g in groups if g[0] in stage]
            accs = {
                g[0]: HessianAccumulator(
                    linears[g[0]].in_features, device, absmax=opts.input_absmax
                )
                for g in stage_groups
            }
            passes.run(quantized, accs, reporter.batch, group_end=session.group_end)
            for g in stage_groups:  # the same order on every rank
                accs[g[0]].reduce(world)
            # the stage's jobs (linear x grid), spread over the ranks by their cost
            jobs = [
                (g, name, grid) for g in stage_groups for name in g for grid in grids[prefix + name]
            ]
            owner = assign([_cost(linears[n]) for _, n, _ in jobs], world.size)
            solved: dict[int, tuple[QuantizedTensor, LinearReport]] = {}
            # each group's Hessian read out (where this rank solves one of its jobs) over its
            # accumulator's float32 sum, and the float64 pair freed: 5x the Hessian's bytes,
            # which the solver's own matrices would come on top of (the memory plan counts
            # one or the other)
            owned = {g[0] for k, (g, _, _) in enumerate(jobs) if owner[k] == world.rank}
            hessians: dict[str, torch.Tensor] = {}
            for g in stage_groups:
                acc = accs[g[0]]
                if g[0] in owned:  # no input at all: errors measured on nothing
                    hessians[g[0]] = (
                        acc.hessian(release=True)
                        if acc.rows
                        else torch.zeros(acc.columns, acc.columns, device=device)
                    )
                acc.release()
            exact: dict[str, tuple[torch.Tensor, float]] = {}  # per linear, whatever its grids
            last_job = {name: k for k, (_, name, _) in enumerate(jobs)}
            for k, (g, name, grid) in enumerate(jobs):
                if owner[k] != world.rank:
                    continue
                acc = accs[g[0]]
                if name not in exact:
                    w = _exact_weight(session, prefix + name, linears[name])
                    exact[name] = (w, _hessian_error(w, hessians[g[0]]))
                starved = g[0] in experts and acc.rows < MIN_EXPERT_TOKENS
                w, ref = exact.pop(name) if last_job[name] == k else exact[name]
                solved[k] = _solve(
                    session, w, ref, prefix + name, grid, hessians[g[0]], acc, starved, opts
                )
                del w
            del hessians, exact
            if world.active:
                solved = _exchange(world, jobs, prefix, solved)
            warned: set[str] = set()
            for k, (g, name, grid) in enumerate(jobs):
                acc = accs[g[0]]
                if g[0] in experts and acc.rows < MIN_EXPERT_TOKENS and g[0] not in warned:
                    warned.add(g[0])
                    reporter.warn(
                        f"{prefix}{g[0].rsplit('.', 1)[0]}: {acc.rows} calibration tokens "
                        f"reached this expert (fewer than {MIN_EXPERT_TOKENS}): {', '.join(g)} "
                        "rounded to nearest (RTN) instead of GPTQ; more samples or "
                        "--all-experts give it data"
                    )
                q, rep = solved.pop(k)
                if rep.damp > opts.gptq.damp:
                    reporter.warn(
                        f"{rep.name}: the Hessian is not positive definite at damp "
                        f"{opts.gptq.damp:g}; dampened with {rep.damp:g} instead"
                    )
                reports.append(rep)
                if propagate:
                    lin = linears[name]
                    lin.weight.data = q.dequantize().to(device).to(lin.weight.dtype)
                results.append((grid.key, q))
                quantized.add(name)
            del accs
        if not propagate:
            quantized = set()  # the float weights stand: nothing is frozen by quantization
        take_routed(layer)
        # the layer's outputs replace its inputs batch by batch (batch j's input is read by
        # its own forward only): a second copy would be the largest thing of this pass
        passes.run(quantized, None, reporter.batch, out=hidden)
        if (routed := take_routed(layer)) is not None:
            routed = world.sum_ints(routed)
            _report_coverage(reporter, index, routed, moe_blocks(layer)[0].all_experts)
    finally:
        passes.close()
    return results, reports


def _cost(lin: nn.Linear) -> float:
    """GPTQ's work on one linear, for spreading a stage over the ranks: ``rows x cols^2`` for
    the column updates, ``cols^3`` for the Cholesky factor and its inverse."""
    rows, cols = lin.out_features, lin.in_features
    return float(rows * cols * cols + cols**3)


def _solve(
    session: Session,
    w: torch.Tensor,
    ref: float,
    full: str,
    grid: Grid,
    h: torch.Tensor,
    acc: HessianAccumulator,
    starved: bool,
    opts: SequentialOptions,
) -> tuple[QuantizedTensor, LinearReport]:
    """One linear (its float32 weight ``w``, ``ref`` = its output energy under ``h``) on one
    grid: GPTQ (or RTN for a starved expert) and its error report."""
    device = session.device
    r = _rtn_result(full, w, grid) if starved else gptq_quantize(full, w, h, grid, opts.gptq)
    deq = r.weight.dequantize().to(device)
    rtn = grid.rtn(full, w, torch.diag(h) / 2).dequantize().to(device)
    report = LinearReport(
        name=full,
        grid=grid.key,
        gptq_rel_error=(_hessian_error(w - deq, h) / ref) ** 0.5 if ref else 0.0,
        rtn_rel_error=(_hessian_error(w - rtn, h) / ref) ** 0.5 if ref else 0.0,
        damp=r.damp_used,
        input_absmax=float(acc.absmax.max()) if acc.absmax is not None else None,
        method="rtn" if starved else "gptq",
        tokens=acc.rows,
    )
    return r.weight, report


def _exchange(
    world: World,
    jobs: list[tuple[list[str], str, Grid]],
    prefix: str,
    solved: dict[int, tuple[QuantizedTensor, LinearReport]],
) -> dict[int, tuple[QuantizedTensor, LinearReport]]:
    """Every rank's solved jobs to every rank: codes as safetensors bytes (the resume files'
    tensors, never pickle), reports as JSON in its metadata."""
    from safetensors.torch import load, save

    tensors = {
        f"{k}.{f}": t.detach().to("cpu").contiguous()
        for k, (q, _) in solved.items()
        for f, t in q.state().items()
    }
    meta = {"reports": json.dumps({str(k): rep.__dict__ for k, (_, rep) in solved.items()})}
    out = dict(solved)
    for r, blob in enumerate(world.all_gather_bytes(save(tensors, metadata=meta))):
        if r == world.rank:
            continue
        theirs = load(blob)
        head = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])  # the metadata
        reps = json.loads(head.get("__metadata__", {}).get("reports", "{}"))
        for key, rep in reps.items():
            k = int(key)
            _, name, grid = jobs[k]
            state = {f.split(".", 1)[1]: t for f, t in theirs.items() if f.split(".", 1)[0] == key}
            out[k] = (grid.restore(prefix + name, state), LinearReport(**rep))
    return out


def _expert_role(name: str) -> str | None:
    """``gate``/``up``/``down`` role of an MoE expert's linear (``...experts.3.w1``), else None."""
    m = re.search(r"\.experts\.\d+\.(\w+)$", name)
    return m.group(1) if m else None


def _merge_expert_stages(groups: list[list[str]]) -> list[list[str]]:
    """True-sequential stages, with the experts' groups of one role read in one pass: experts
    do not feed one another, so expert ``e``'s gate/up (or down) inputs do not depend on expert
    ``e'``'s quantization; one pass per role instead of one per expert."""
    stages: list[list[str]] = []
    last: tuple[str | None, ...] | None = None
    for g in groups:
        key = tuple(_expert_role(n) for n in g)
        if stages and None not in key and key == last:
            stages[-1].extend(g)
        else:
            stages.append(list(g))
        last = key
    return stages


def _rtn_result(name: str, w: torch.Tensor, grid: Grid) -> GPTQResult:
    """Round to nearest on ``grid``, shaped as a GPTQ result (no dampening)."""
    return GPTQResult(grid.rtn(name, w, None), 0.0, 0.0)


def _report_coverage(reporter: Reporter, index: int, routed: list[int], all_experts: bool) -> None:
    """Tokens routed to each expert of layer ``index`` (the coverage table's row)."""
    s = sorted(routed)
    starved = [f"{e} ({c})" for e, c in enumerate(routed) if c < MIN_EXPERT_TOKENS]
    (reporter.warn if starved else reporter.info)(
        f"layer {index} experts: tokens routed min {s[0]} / median {s[len(s) // 2]} / max {s[-1]}"
        + (f"; starved (< {MIN_EXPERT_TOKENS}): {', '.join(starved)}" if starved else "")
        + (" [every expert saw every token]" if all_experts else "")
    )
