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
the hidden-state cache (``samples x seq_len x hidden`` in the compute dtype); the rest of the
model is never in memory. This follows the sequential scheme of GPTQ's reference code
(Frantar et al. 2022, ``llama_sequential``), without quantizing between layers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qtool.calibrate.stats import LinearStats, NonFiniteError, StatsCollector
from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, QToolError, UnsupportedError
from qtool.events import SILENT, Reporter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadInputError(f"--device {device}: not a device (use auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(
            f"--device {device}: CUDA is not available here", hint="use --device cpu"
        )
    return dev


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
        from qtool.runner.moe import conversion_reader

        model_type = str(self.ckpt.config.get("model_type", ""))
        for c in self._candidates(name):
            reader = conversion_reader(t, self.ckpt.read, model_type, c)
            if reader is not None:
                return c, reader
        raise UnsupportedError(
            f"{self.ckpt.source}: the model needs tensor {name}, which the checkpoint lacks",
            hint="is the checkpoint complete, and is it the architecture config.json names?",
        )

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
    cache_dev: torch.device,
    progress: Reporter,
) -> tuple[list[torch.Tensor], LayerArgs]:
    """Run the model's own forward with every decoder layer stubbed: returns the hidden states
    entering layer 0 (one tensor per batch, on ``cache_dev``) and, per batch size, the extra
    arguments the model passes each layer (masks, rotary embeddings...)."""
    loader.load(parts.embed, parts.embed_name + ".")
    hidden: list[torch.Tensor] = []
    layer_args: LayerArgs = {}
    recording: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    n_layers = len(parts.layers)

    def sink(i: int, h: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if i == 0:
            hidden.append(h.detach().to(cache_dev))
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
    return hidden, layer_args


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
    cache_device: torch.device | None = None,
    all_experts: bool = False,
) -> LayerwiseResult:
    """Collect input/output statistics of every linear layer of ``ckpt`` on token ``ids``
    (``[samples, seq_len]``), one decoder layer at a time. MoE layers count the tokens routed to
    each expert; ``all_experts`` runs every token through every expert for the statistics."""
    from qtool.runner.moe import set_all_experts, take_routed

    t0 = time.perf_counter()
    device = device or pick_device()
    progress = progress or SILENT
    model = build_skeleton(ckpt, dtype)
    parts = _parts(model)
    loader = WeightLoader(ckpt, device, dtype)
    n_layers = len(parts.layers)
    batches = list(ids.split(max(1, batch_size)))
    cache_dev = cache_device or _cache_device(device, ids, parts, dtype)
    stage_s: dict[str, float] = {}
    total = n_layers + 2

    buffers_to(model, device)

    # -- 1. embeddings: the model's own forward, layers stubbed ---------------------------------
    s0 = time.perf_counter()
    progress.stage("embeddings", 0, total, len(batches))
    hidden, layer_args = embedding_pass(model, parts, loader, batches, device, cache_dev, progress)
    real = list(parts.layers)
    stage_s["embeddings"] = time.perf_counter() - s0
    progress.stage_done("embeddings", stage_s["embeddings"])

    # -- 2. decoder layers, one at a time --------------------------------------------------------
    stats: dict[str, LinearStats] = {}
    routed: dict[int, list[int]] = {}
    for i, layer in enumerate(real):
        s0 = time.perf_counter()
        name = f"layer {i}"
        progress.stage(name, i + 1, total, len(batches))
        prefix = f"{parts.layers_name}.{i}."
        loader.load(layer, prefix)
        set_all_experts(layer, all_experts)
        col = StatsCollector(device, hessian=hessian)
        col.attach(layer, prefix)
        try:
            with torch.no_grad():
                for j, b in enumerate(batches):
                    args, kwargs = layer_args[b.shape[0]][i]
                    out = layer(hidden[j].to(device), *args, **kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    col.end_batch()
                    hidden[j] = out.to(cache_dev)
                    progress.batch()
        except NonFiniteError as e:
            raise QToolError(
                f"layer {i}: {e}",
                hint="use --dtype float32" if dtype != torch.float32 else "check the weights",
            ) from e
        finally:
            stats.update(col.detach())
            if (counts := take_routed(layer)) is not None:
                routed[i] = counts
            WeightLoader.unload(layer)
        stage_s[name] = time.perf_counter() - s0
        progress.stage_done(name, stage_s[name])

    # -- 3. final norm: the lm_head input -------------------------------------------------------
    s0 = time.perf_counter()
    progress.stage("norm", total - 1, total, len(batches))
    if lm_head and parts.lm_head_name:
        loader.load(parts.norm, parts.norm_name + ".")
        col = StatsCollector(device, hessian=hessian, outputs=False)
        with torch.no_grad():
            for j in range(len(batches)):
                y = parts.norm(hidden[j].to(device))
                col.observe_input(parts.lm_head_name, y, parts.lm_head_in)
                col.end_batch()
                progress.batch()
        stats.update(col.detach())
        WeightLoader.unload(parts.norm)
    hidden.clear()
    stage_s["norm"] = time.perf_counter() - s0
    progress.stage_done("norm", stage_s["norm"])
    return LayerwiseResult(
        stats=stats,
        tokens=int(ids.numel()),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        seconds=time.perf_counter() - t0,
        stage_seconds=stage_s,
        routed=routed,
    )


def _cache_device(
    device: torch.device, ids: torch.Tensor, parts: _Parts, dtype: torch.dtype
) -> torch.device:
    """Keep the hidden-state cache on the GPU when it takes under half of its free memory."""
    if device.type != "cuda":
        return device
    hidden = getattr(parts.embed, "embedding_dim", None) or parts.lm_head_in or 0
    need = ids.numel() * hidden * torch.tensor([], dtype=dtype).element_size()
    free, _total = torch.cuda.mem_get_info(device)
    return device if need < free // 2 else torch.device("cpu")


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
