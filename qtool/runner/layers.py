"""Run a model one decoder layer at a time, reading each layer's weights lazily.

The model is built from its config as a skeleton whose parameters live on the ``meta`` device
(buffers such as rotary frequencies are real: they are computed, not stored). Then:

1. **embeddings**: the embedding weights are loaded and the model's own forward runs with every
   decoder layer replaced by a stub. The first stub records the hidden states entering layer 0
   (embedding scaling included); each stub records the arguments the model passes its layer
   (attention mask, rotary position embeddings, per-layer-type masks for Gemma 3...). The
   last stub stops the forward. The embeddings are dropped.
2. **layer i**: its weights are read from the checkpoint (one tensor at a time, in the compute
   dtype), hooks on its linear layers feed the accumulators, it runs on the cached hidden
   states of layer ``i-1`` batch by batch, replacing them in place with its output. Its
   weights go back to ``meta`` and its statistics move to the CPU.
3. **final norm**: its output is the ``lm_head`` input (the logits themselves are not needed).

Peak memory is about one layer's weights (or the embedding matrix, whichever is larger) plus
the hidden-state cache (``samples x seq_len x hidden`` in the compute dtype), which the memory
plan (:mod:`.memory`) keeps on the device, in host memory or on disk (:mod:`.stash`); the rest
of the model is never in memory. This follows the sequential scheme of GPTQ's reference code
(Frantar et al. 2022, ``llama_sequential``). :class:`Session` is that scheme, shared by
calibration (:func:`calibrate_layerwise`) and GPTQ (:mod:`.sequential`).

The compute dtype (``auto``: bfloat16 where the device multiplies it fast — a GPU with bf16, a
CPU with AMX — else float32) is the forward passes'; accumulators (statistics, Hessians) stay
float32 or float64, and GPTQ solves on the checkpoint's own weights.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, QToolError, UnsupportedError
from qtool.events import SILENT, Reporter
from qtool.observers.stats import LinearStats, NonFiniteError, StatsCollector
from qtool.runner import dist
from qtool.runner.dist import World, die_here, group_ends, groups, local_cuda, shard
from qtool.runner.memory import release_freed
from qtool.runner.stash import Stash
from qtool.runner.workdir import WorkFolder, checkpoint_every

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPES = ("auto", *DTYPES)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: ``auto`` is bfloat16 where the device has fast bfloat16 products (a
    CUDA GPU that supports it; a CPU with AMX), else float16 on older GPUs and float32 on other
    CPUs. AVX-512 BF16 alone is not enough: on such a CPU (AMX hidden by its VM) oneDNN's
    bf16 kernels ran SmolLM2's linears at half the float32 rate (126 against 234 GFLOP/s at
    512 x 576 x 1536, 2 threads), where AMX runs them about 2.5x faster than float32."""
    if name != "auto":
        if name not in DTYPES:
            raise BadInputError(f"--compute-dtype {name}: use one of {', '.join(COMPUTE_DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if "amx_bf16" in cpu_flags():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Stop(Exception):
    """Raised by the last stub: the embedding pass is done."""


@dataclass
class LayerwiseResult:
    """Statistics of every linear layer, and how they were computed."""

    stats: dict[str, LinearStats]
    tokens: int
    device: str
    dtype: str
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # MoE: tokens routed to each expert (top-k), per layer index
    routed: dict[int, list[int]] = field(default_factory=dict)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when CUDA is available, else the CPU."""
    if device == "auto":
        return local_cuda(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadInputError(f"--device {device}: not a device (use auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(
            f"--device {device}: CUDA is not available here", hint="use --device cpu"
        )
    return local_cuda(dev)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on ``meta`` and their buffers real (the idea of
    accelerate's ``init_empty_weights(include_buffers=False)``): no weight memory is used, and
    computed buffers such as rotary ``inv_freq`` keep their values."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The causal-LM module tree of ``ckpt`` with parameters on ``meta`` (no remote code)."""
    if not ckpt.hf_layout:
        raise UnsupportedError(
            f"{ckpt.source}: calibrate runs the model from a safetensors checkpoint, "
            f"not {ckpt.format}",
            hint="pass the Hugging Face checkpoint folder (for a GGUF file use llama-imatrix)",
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtool.models import family_for

    attn = family_for(ckpt.config, strict=False).attn_implementation
    try:
        config = AutoConfig.from_pretrained(str(ckpt.root), trust_remote_code=False)
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn, trust_remote_code=False
            )
            _install_moe(model, ckpt, dtype)
    except (ValueError, KeyError, ImportError) as e:
        raise UnsupportedError(
            f"{ckpt.source}: transformers cannot build this architecture "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            hint="qtool never runs remote code; use a model transformers supports natively",
        ) from e
    model.eval()
    return model


def _install_moe(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """Mixture-of-experts families: one ``nn.Linear`` per expert (:mod:`qtool.runner.moe`)."""
    from qtool.models import family_for

    spec = getattr(family_for(ckpt.config, strict=False), "moe_spec", lambda: None)()
    if spec is not None:
        from qtool.runner.moe import install_moe_blocks

        install_moe_blocks(_parts(model).layers, spec)
        model.to(dtype)


@dataclass
class _Parts:
    base: nn.Module  # the decoder stack (LlamaModel, Gemma3TextModel...)
    layers: nn.ModuleList
    layers_name: str  # e.g. "model.layers"
    norm: nn.Module
    norm_name: str
    embed: nn.Module
    embed_name: str
    lm_head_name: str | None
    lm_head_in: int


def _parts(model: nn.Module) -> _Parts:
    names = {id(m): n for n, m in model.named_modules()}
    m: Any = model  # transformers' PreTrainedModel accessors
    base = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", None)
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None)
    embed = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    if base is None or not isinstance(layers, nn.ModuleList) or norm is None or embed is None:
        raise UnsupportedError(
            f"{type(model).__name__}: not a decoder stack qtool can run layer by layer "
            "(needs .layers, .norm and input embeddings)"
        )
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    head_name = names.get(id(head)) if isinstance(head, nn.Linear) else None
    return _Parts(
        base=base,
        layers=layers,
        layers_name=names[id(layers)],
        norm=norm,
        norm_name=names[id(norm)],
        embed=embed,
        embed_name=names[id(embed)],
        lm_head_name=head_name,
        lm_head_in=head.in_features if isinstance(head, nn.Linear) else 0,
    )


def buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the buffers computed at construction (rotary ``inv_freq``...) to ``device``; the
    parameters stay on ``meta`` until :class:`WeightLoader` reads them."""
    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                mod._buffers[bname] = buf.to(device)


class WeightLoader:
    """Reads a module's parameters from the checkpoint, one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        self.ckpt = ckpt
        self.device = device
        self.dtype = dtype
        self.bytes_read = 0

    def _candidates(self, name: str) -> list[str]:
        cands = [name, f"model.{name}", name.removeprefix("model.")]
        if name.startswith("model."):
            cands.append("model.language_model." + name.removeprefix("model."))
        return cands

    def _reader(self, name: str) -> tuple[str, Callable[[], torch.Tensor]]:
        """(what is read, how) for the model's parameter ``name``: the checkpoint tensor of that
        name, else through transformers' weight conversions (:func:`qtool.runner.moe.
        conversion_reader`: fused MoE experts built from per-expert tensors, or sliced)."""
        t = self.ckpt.tensors
        for c in self._candidates(name):
            if c in t:
                return c, lambda c=c: self.ckpt.read(c)
        from qtool.models import family_for
        from qtool.runner.moe import conversion_reader

        model_type = str(self.ckpt.config.get("model_type", ""))
        family = family_for(self.ckpt.config, strict=False)
        rows = self.ckpt.read_rows if self.ckpt.format == "safetensors" else None
        for c in self._candidates(name):
            virtual = family.virtual_reader(c, t, self.ckpt.read, rows)
            if virtual is not None:  # a tensor the family derives (one expert of gpt-oss)
                return c, lambda v=virtual: torch.as_tensor(v())
            reader = conversion_reader(t, self.ckpt.read, model_type, c, rows)
            if reader is not None:
                return c, reader
        raise UnsupportedError(
            f"{self.ckpt.source}: the model needs tensor {name}, which the checkpoint lacks",
            hint="is the checkpoint complete, and is it the architecture config.json names?",
        )

    def read(self, name: str) -> torch.Tensor:
        """One checkpoint tensor as stored (for the model's parameter ``name``)."""
        return self._reader(name)[1]()

    def load(self, module: nn.Module, prefix: str) -> None:
        """Materialize every parameter of ``module`` (named ``prefix + name`` in the model)."""
        for pname, param in list(module.named_parameters()):
            src, read = self._reader(prefix + pname)
            info = self.ckpt.tensors.get(src)
            if info is not None and tuple(info.shape) != tuple(param.shape):
                raise UnsupportedError(
                    f"{self.ckpt.source}: tensor {src} has shape {tuple(info.shape)}, "
                    f"the config implies {tuple(param.shape)}"
                )
            t = read()
            self.bytes_read += info.nbytes if info is not None else t.numel() * t.element_size()
            if tuple(t.shape) != tuple(param.shape):
                raise UnsupportedError(
                    f"{self.ckpt.source}: {src} reads as shape {tuple(t.shape)}, "
                    f"the config implies {tuple(param.shape)}"
                )
            t = t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)
            _set(module, pname, nn.Parameter(t, requires_grad=False))
        for bname, buf in list(module.named_buffers()):
            if buf.device.type != "meta":
                _set(module, bname, buf.to(self.device), buffer=True)
                continue
            raise UnsupportedError(f"{self.ckpt.source}: buffer {prefix}{bname} has no value")

    @staticmethod
    def unload(module: nn.Module) -> None:
        """Send ``module``'s parameters back to ``meta``, freeing their memory."""
        for pname, param in list(module.named_parameters()):
            _set(module, pname, nn.Parameter(param.to("meta"), requires_grad=False))


def _set(module: nn.Module, dotted: str, value: Any, *, buffer: bool = False) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    if buffer:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = value


class _Stub(nn.Module):
    """Stands in for decoder layer ``index`` during the embedding pass."""

    def __init__(self, inner: nn.Module, index: int, sink: Callable[..., None], last: bool):
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        self._index = index
        self._sink = sink
        self._last = last

    def __getattr__(self, name: str) -> Any:  # e.g. Gemma 3 reads layer.attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._sink(self._index, hidden_states, args, kwargs)
        if self._last:
            raise _Stop
        return hidden_states


LayerArgs = dict[int, list[tuple[tuple[Any, ...], dict[str, Any]]]]


def embedding_pass(
    model: nn.Module,
    parts: _Parts,
    loader: WeightLoader,
    batches: list[torch.Tensor],
    device: torch.device,
    hidden: Stash,
    progress: Reporter,
) -> LayerArgs:
    """Run the model's own forward with every decoder layer stubbed: the hidden states entering
    layer 0 go into ``hidden`` (one tensor per batch); returns, per batch size, the extra
    arguments the model passes each layer (masks, rotary embeddings...)."""
    loader.load(parts.embed, parts.embed_name + ".")
    layer_args: LayerArgs = {}
    recording: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    n_layers = len(parts.layers)

    def sink(i: int, h: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if i == 0:
            hidden.append(h)
        recording.append((args, kwargs))

    real = list(parts.layers)
    for i, layer in enumerate(real):
        parts.layers[i] = _Stub(layer, i, sink, last=i == n_layers - 1)
    try:
        with torch.no_grad():
            for b in batches:
                recording.clear()
                try:
                    parts.base(input_ids=b.to(device), use_cache=False)
                except _Stop:
                    pass
                if len(recording) != n_layers:
                    raise QToolError(
                        f"{type(model).__name__}: the embedding pass reached "
                        f"{len(recording)} of {n_layers} layers"
                    )
                layer_args.setdefault(b.shape[0], list(recording))
                progress.batch()
    finally:
        for i, layer in enumerate(real):
            parts.layers[i] = layer
    WeightLoader.unload(parts.embed)
    return layer_args


def fingerprint(ckpt: Checkpoint) -> dict[str, Any]:
    """What identifies a model's weights across machines (not its path): shape numbers, tensor
    headers, and a few elements of a few tensors."""
    import hashlib

    from qtool.observers.statsfile import model_identity, sample_weights

    heads = sorted((n, list(t.shape), str(t.dtype)) for n, t in ckpt.tensors.items())
    try:
        sample = sample_weights(ckpt)[1].tobytes()
    except (OSError, AttributeError, KeyError, ValueError):  # a view over another format
        sample = b""
    return {
        **{k: v for k, v in model_identity(ckpt).items() if k != "source"},
        "tensors": hashlib.sha256(repr(heads).encode()).hexdigest(),
        "sample": hashlib.sha256(sample).hexdigest(),
    }


class Session:
    """One layer-by-layer run over calibration token ``ids``: the model's skeleton, its weights
    read lazily, the hidden states between layers in a :class:`Stash` placed by the memory plan
    (``place``: device, host or disk), and the per-layer arguments the embedding pass recorded.
    Calibration and GPTQ both drive one.

    Under torchrun (``world``), the session holds this rank's shard of the batches (whole groups
    of consecutive batches, :mod:`qtool.runner.dist`): ``batches`` and the hidden states are the
    shard's, ``first`` is its first batch's index among all, ``group_end[j]`` says whether local
    batch ``j`` closes a group (the accumulators' exact sums fold there). Every rank must run the
    same model on the same tokens: that is checked first."""

    def __init__(
        self,
        ckpt: Checkpoint,
        ids: torch.Tensor,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 1,
        place: str = "device",
        folder: Path | None = None,
        reporter: Reporter = SILENT,
        world: World | None = None,
    ) -> None:
        from qtool.models import family_for

        self.ckpt = ckpt
        self.family = family_for(ckpt.config, strict=False)
        self.device = device
        self.dtype = dtype
        self.place = place
        self.folder = folder
        self.reporter = reporter
        self.world = w = world if world is not None else World()
        everything = list(ids.split(max(1, batch_size)))
        self.n_total = len(everything)
        self.batch_tokens = max(1, batch_size) * int(ids.shape[-1]) if ids.dim() > 1 else 0
        if w.active:
            import hashlib

            w.agree(
                {
                    "the model": fingerprint(ckpt),
                    "the calibration data": [
                        list(ids.shape),
                        hashlib.sha256(ids.to(torch.int32).numpy().tobytes()).hexdigest(),
                    ],
                    "the batch size, device type and compute dtype": [
                        batch_size,
                        device.type,
                        str(dtype),
                    ],
                }
            )
            n_groups = len(groups(self.n_total, self.batch_tokens))
            if n_groups < w.size:
                raise BadInputError(
                    f"{w.size} ranks for {self.n_total} calibration batches in {n_groups} "
                    "groups: every rank needs at least one",
                    hint=f"run at most {n_groups} processes, or calibrate on more samples",
                )
        self.tokens = int(ids.numel())  # all ranks' (the checkpoints hold every batch)
        mine = shard(self.n_total, w.rank, w.size, self.batch_tokens)
        self.batches = everything[mine.start : mine.stop]
        self.group_end = group_ends(mine, self.n_total, self.batch_tokens)
        self.model = build_skeleton(ckpt, dtype)
        self.parts = _parts(self.model)
        self.loader = WeightLoader(ckpt, device, dtype)
        self.layers = list(self.parts.layers)
        self.hidden = self.stash("hidden")
        self.layer_args: LayerArgs = {}
        release_freed()  # what reading and tokenizing the calibration text left
        buffers_to(self.model, device)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def shards(self) -> list[range]:
        """Every rank's batches (by index among all)."""
        return [
            shard(self.n_total, r, self.world.size, self.batch_tokens)
            for r in range(self.world.size)
        ]

    def stash(self, name: str) -> Stash:
        """A new per-batch store placed as the plan says."""
        return Stash(self.place, self.device, folder=self.folder, name=name)

    def embed(self, total: int) -> None:
        """The embedding pass: hidden states entering layer 0, and every layer's arguments."""
        t0 = time.perf_counter()
        self.reporter.stage("embeddings", 0, total, len(self.batches))
        self.hidden.clear()
        self.layer_args = embedding_pass(
            self.model,
            self.parts,
            self.loader,
            self.batches,
            self.device,
            self.hidden,
            self.reporter,
        )
        release_freed()  # the embedding matrix and the pass's activations
        self.reporter.stage_done("embeddings", time.perf_counter() - t0)

    def prefix(self, i: int) -> str:
        return f"{self.parts.layers_name}.{i}."

    def args(self, i: int) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Layer ``i``'s extra arguments, one per batch."""
        return [self.layer_args[b.shape[0]][i] for b in self.batches]

    @contextlib.contextmanager
    def loaded(self, i: int) -> Iterator[nn.Module]:
        """Layer ``i`` with its weights read, freed again afterwards."""
        layer = self.layers[i]
        self.loader.load(layer, self.prefix(i))
        try:
            yield layer
        finally:
            WeightLoader.unload(layer)
            release_freed()

    def forward(self, layer: nn.Module, i: int, out: Stash | None = None) -> Stash:
        """Run ``layer`` over every batch of the hidden states; the outputs replace them (or go
        to ``out``)."""
        args = self.args(i)
        target = out if out is not None else self.hidden
        with torch.no_grad():
            for j in range(len(self.batches)):
                a, k = args[j]
                y = layer(self.hidden[j], *a, **k)
                target[j] = y[0] if isinstance(y, (tuple, list)) else y
                self.reporter.batch()
        return target

    def close(self) -> None:
        self.hidden.close()


class CalibrationWork(WorkFolder):
    """``qtool calibrate``'s resume folder: each finished layer's statistics (exact: float64
    sums, integer histograms), its MoE routing counts, hidden-state checkpoints."""

    kind = "calibration"

    def save_stats(
        self,
        i: int,
        stats: dict[str, LinearStats],
        routed: list[int] | None,
        hidden: Stash | None,
    ) -> None:
        tensors = {f"{n}.{k}": t for n, s in stats.items() for k, t in s.to_state().items()}
        report = {
            "layer": i,
            "linears": {n: s.shares_input_with for n, s in stats.items()},
            "routed": routed,
        }
        self.save(i, tensors, [report], hidden)

    def layer_stats(self, i: int) -> tuple[dict[str, LinearStats], list[int] | None]:
        report = next(r for r in self.reports if r["layer"] == i)
        tensors = self.layer_tensors(i)
        out: dict[str, LinearStats] = {}
        for name, shares in report["linears"].items():
            p = name + "."
            state = {k.removeprefix(p): t for k, t in tensors.items() if k.startswith(p)}
            out[name] = LinearStats.from_state(name, state, shares)
        return out, report["routed"]


def calibrate_layerwise(
    ckpt: Checkpoint,
    ids: torch.Tensor,
    *,
    batch_size: int = 1,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    hessian: bool = False,
    lm_head: bool = True,
    progress: Reporter | None = None,
    place: str | None = None,
    folder: Path | None = None,
    all_experts: bool = False,
    work: CalibrationWork | None = None,
    world: World | None = None,
) -> LayerwiseResult:
    """Collect input/output statistics of every linear layer of ``ckpt`` on token ``ids``
    (``[samples, seq_len]``), one decoder layer at a time. ``place``: where the hidden states
    between layers live (device, host, disk; default: the device, or host memory when a GPU
    lacks room). MoE layers count the tokens routed to each expert; ``all_experts`` runs every
    token through every expert for the statistics. ``work``: the resume folder (each layer's
    statistics, hidden-state checkpoints); a run it holds continues from its last checkpoint.
    Under torchrun (``world``, by default the process's) each rank runs its shard of the samples
    and the statistics are combined exactly: every rank gets the single-process result (on
    resume, rank 0 alone reads the finished layers' statistics)."""
    t0 = time.perf_counter()
    device = device or pick_device()
    progress = progress or SILENT
    where = place or _cache_place(device, ids, ckpt, dtype)
    world = world if world is not None else dist.world()
    session = Session(
        ckpt,
        ids,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        place=where,
        folder=folder,
        reporter=progress,
        world=world,
    )
    try:
        return _calibrate(
            session,
            ids,
            t0,
            hessian=hessian,
            lm_head=lm_head,
            all_experts=all_experts,
            work=work,
        )
    finally:
        session.close()


def _calibrate(
    session: Session,
    ids: torch.Tensor,
    t0: float,
    *,
    hessian: bool,
    lm_head: bool,
    all_experts: bool = False,
    work: CalibrationWork | None = None,
) -> LayerwiseResult:
    from qtool.runner.moe import set_all_experts, take_routed

    progress, device, dtype = session.reporter, session.device, session.dtype
    n_batches = len(session.batches)
    total = session.n_layers + 2
    stage_s: dict[str, float] = {}
    s0 = time.perf_counter()
    session.embed(total)
    stage_s["embeddings"] = time.perf_counter() - s0

    world = session.world
    ends = session.group_end
    stats: dict[str, LinearStats] = {}
    routed: dict[int, list[int]] = {}
    start = 0
    if work is not None and work.hidden_at:
        # statistics depend only on a layer's inputs: continue from the last checkpoint
        start = work.hidden_at
        progress.info(f"resuming at layer {start} of {session.n_layers} from {work.path}")
        work.load_hidden(session.hidden, session.shards())
        work.reports = [r for r in work.reports if r["layer"] < start]
        for i in range(start if world.is_main else 0):  # only rank 0 writes them out
            layer_stats, counts = work.layer_stats(i)
            stats.update(layer_stats)
            if counts is not None:
                routed[i] = counts
    every = checkpoint_every(session)
    for i in range(start, session.n_layers):
        s0 = time.perf_counter()
        name = f"layer {i}"
        die_here(i)
        progress.stage(name, i + 1, total, n_batches)
        col = StatsCollector(device, hessian=hessian)
        with session.loaded(i) as layer:
            set_all_experts(layer, all_experts)
            col.attach(layer, session.prefix(i))
            try:
                args = session.args(i)
                with torch.no_grad():
                    for j in range(n_batches):
                        a, k = args[j]
                        out = layer(session.hidden[j], *a, **k)
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        col.end_batch(ends[j])
                        session.hidden[j] = out
                        progress.batch()
                col.reduce(world)
            except NonFiniteError as e:
                raise QToolError(
                    f"layer {i}: {e}" + (f" (rank {world.rank}'s samples)" if world.active else ""),
                    hint="use --compute-dtype float32"
                    if dtype != torch.float32
                    else "check the weights",
                ) from e
            finally:
                layer_stats = col.detach()
                stats.update(layer_stats)
                counts = take_routed(layer)
            if counts is not None:
                routed[i] = world.sum_ints(counts)
        if work is not None:
            last = i + 1 == session.n_layers
            checkpoint = not last and (i + 1) % every == 0
            work.save_stats(i, layer_stats, routed.get(i), session.hidden if checkpoint else None)
        stage_s[name] = time.perf_counter() - s0
        progress.stage_done(name, stage_s[name])

    # -- the final norm: the lm_head input -------------------------------------------------------
    s0 = time.perf_counter()
    progress.stage("norm", total - 1, total, n_batches)
    parts = session.parts
    if lm_head and parts.lm_head_name:
        session.loader.load(parts.norm, parts.norm_name + ".")
        col = StatsCollector(device, hessian=hessian, outputs=False)
        with torch.no_grad():
            for j in range(n_batches):
                y = parts.norm(session.hidden[j])
                col.observe_input(parts.lm_head_name, y, parts.lm_head_in)
                col.end_batch(ends[j])
                progress.batch()
        col.reduce(world)
        stats.update(col.detach())
        WeightLoader.unload(parts.norm)
    session.hidden.clear()
    stage_s["norm"] = time.perf_counter() - s0
    progress.stage_done("norm", stage_s["norm"])
    return LayerwiseResult(
        stats=stats,
        tokens=int(ids.numel()),  # all ranks' (ids are every sample, on every rank)
        device=str(device),
        dtype=dtype_name(dtype),
        seconds=time.perf_counter() - t0,
        stage_seconds=stage_s,
        routed=routed,
    )


def _cache_place(
    device: torch.device, ids: torch.Tensor, ckpt: Checkpoint, dtype: torch.dtype
) -> str:
    """Without a memory plan: the hidden states stay on the device, or in host memory when a GPU
    would have to give them over half of its free memory."""
    if device.type != "cuda":
        return "device"
    from qtool.models.spec import ModelSpec

    hidden = ModelSpec.from_config(ckpt.config).hidden
    need = ids.numel() * hidden * torch.tensor([], dtype=dtype).element_size()
    free, _total = torch.cuda.mem_get_info(device)
    return "device" if need < free // 2 else "host"


def collect_whole_model(
    model: nn.Module, ids: torch.Tensor, *, batch_size: int = 1, hessian: bool = False
) -> dict[str, LinearStats]:
    """The same statistics from an ordinary full forward of a loaded model (the reference the
    layer-by-layer path is checked against)."""
    device = next(model.parameters()).device
    col = StatsCollector(device, hessian=hessian)
    col.attach(model, "")
    try:
        with torch.no_grad():
            for b in ids.split(max(1, batch_size)):
                model(input_ids=b.to(device), use_cache=False)
                col.end_batch()
    finally:
        out = col.detach()
    return out
