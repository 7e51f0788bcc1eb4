"""Checkpoint folders (safetensors shards, config, tokenizer, model card), streamed and atomic.

:func:`write_folder` is the one folder writer: it takes the tensors one at a time, streams
them into safetensors shards of at most ``MAX_SHARD_BYTES`` (holding one tensor at a time,
:mod:`.streamed`), copies the tokenizer and generation config, and builds everything in a
temporary sibling folder that replaces ``out_dir`` only once complete
(:func:`qtool.io.atomic_dir`); any failure removes it. :func:`write_checkpoint` uses it for the
integer formats (GPTQ v1, compressed-tensors), whose tensor layouts live in :mod:`.gptq` and
:mod:`.compressed` (bit packing: :mod:`.packing`); :mod:`.bitnet` and :mod:`.dense` use it too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, QToolError
from qtool.events import SILENT, Reporter
from qtool.formats.streamed import SafetensorsFile
from qtool.grids.affine import QuantizedWeight, QuantScheme
from qtool.io import atomic_dir, check_writable

FORMATS = ("gptq", "compressed-tensors")
MAX_SHARD_BYTES = 2 * 10**9  # ~2 GB per shard, as transformers' save_pretrained default-ish
# Files copied from the source folder when present (config.json is rewritten, not copied).
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
COPIED_GLOBS = ("chat_template*", "*.tiktoken")


@dataclass
class ActivationQuant:
    """W8A8 input activations: int8 symmetric, per-token dynamic or per-tensor static."""

    bits: int = 8
    dynamic: bool = True  # True: per-token dynamic; False: static per-tensor
    input_scales: dict[str, float] | None = None  # static: module name -> scale (absmax/127)


@dataclass
class WriteRequest:
    """What to write: the source checkpoint, where, the format, and the quantized weights."""

    source: Checkpoint  # unquantized checkpoint: config, tokenizer files, other tensors
    out_dir: Path
    format: str  # "gptq" | "compressed-tensors"
    scheme: QuantScheme
    # module name ("model.layers.0.self_attn.q_proj") -> lazy QuantizedWeight of name + ".weight"
    weights: dict[str, Callable[[], QuantizedWeight]]
    method: str = "rtn"  # "rtn" | "gptq" (card + config)
    activations: ActivationQuant | None = None
    # tensor name -> replacement float tensor, stored in its own dtype (e.g. folded norms)
    float_overrides: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    gptq: dict[str, Any] = field(default_factory=dict)  # desc_act, static_groups, damp_percent..
    card: dict[str, Any] = field(default_factory=dict)  # command, dataset, samples, seq_len ...
    # called with the finished temp folder before the card is written; returns quality numbers
    measure: Callable[[Path], dict[str, Any]] | None = None
    recipe: dict[str, Any] | None = None  # the resolved recipe, recorded as recipe.json
    reporter: Reporter = SILENT


@dataclass
class WriteResult:
    """The written folder: its files, sizes, config and the footprint data for the report."""

    path: Path
    files: list[str]
    bytes: int  # every file in the folder
    tensor_bytes: int  # the safetensors shards
    params: int
    bits_per_weight: float  # 8 * tensor_bytes / params
    quantization_config: dict[str, Any]
    quality: dict[str, Any] | None = None
    footprint: dict[str, Any] | None = None  # qtool.footprint.build_report(source).as_dict()

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": self.files,
            "bytes": self.bytes,
            "tensor_bytes": self.tensor_bytes,
            "params": self.params,
            "bits_per_weight": self.bits_per_weight,
            "quantization_config": self.quantization_config,
            "quality": self.quality,
            "footprint": self.footprint,
        }


def write_checkpoint(req: WriteRequest) -> WriteResult:
    """Write ``req`` as a checkpoint folder at ``req.out_dir`` (replaced only on success).

    Raises :class:`BadInputError` for what the format cannot store or a missing/unwritable
    output location (before any work where it can be known), :class:`OutputError` for a full
    disk or another write failure; nothing is left behind on failure."""
    fmt = _check_request(req)
    out = Path(req.out_dir).expanduser().resolve()
    with atomic_dir(out) as tmp:
        result = _write_into(req, fmt, tmp, out)
    result.path = out
    return result


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_request(req: WriteRequest) -> str:
    from qtool.formats import compressed, gptq

    fmt = req.format.lower()
    if fmt not in FORMATS:
        raise BadInputError(f"--format {req.format}: unknown", hint=f"use {' or '.join(FORMATS)}")
    if not req.source.hf_layout:
        raise BadInputError(
            f"{req.source.source}: a {req.source.format} source cannot be written as {fmt}",
            hint="quantize from a Hugging Face safetensors checkpoint",
        )
    acts = req.activations
    if fmt == "gptq":
        gptq.check_scheme(req.scheme)
        if acts is not None:
            raise BadInputError(
                "the GPTQ format stores weight-only quantization, not activation scales",
                hint="use --format compressed-tensors for W8A8",
            )
    else:
        compressed.check_scheme(req.scheme, acts.bits if acts else None)
    missing = [m for m in req.weights if f"{m}.weight" not in req.source.tensors]
    missing += [t for t in req.float_overrides if t not in req.source.tensors]
    if missing:
        raise BadInputError(
            f"{missing[0]}: not a tensor of {req.source.source}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if acts is not None and not acts.dynamic:
        scales = acts.input_scales or {}
        lacking = [m for m in req.weights if m not in scales]
        if lacking:
            raise BadInputError(
                f"static activations: no input scale for {lacking[0]}",
                hint="calibrate every quantized layer, or use dynamic per-token activations",
            )
    check_writable(req.out_dir, folder=True)
    return fmt


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


class _Shards:
    """Streams the tensors into safetensors shards, starting a new one before a tensor that
    would take the current one over ``limit`` bytes. Each shard is written as its tensors
    arrive (:class:`qtool.formats.streamed.SafetensorsFile`), so the writer holds one tensor,
    not a shard (up to 2 GB); the files are the bytes ``save_file`` would write for the same
    tensors."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self.current: SafetensorsFile | None = None
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        shard = self.current
        if shard is not None and shard.entries and shard.bytes + n > self.limit:
            self.flush()
        if self.current is None:
            path = self.folder / f"part-{len(self.parts):05d}.safetensors"
            self.current = SafetensorsFile(path, metadata={"format": "pt"})
        self.current.add(name, t)
        self.total += n

    def flush(self) -> None:
        shard, self.current = self.current, None
        if shard is None:
            return
        shard.close()
        self.parts.append((shard.path, shard.names))

    def discard(self) -> None:
        """After a failure: close and remove the shard being written (its spool)."""
        if self.current is not None:
            self.current.discard()
            self.current = None

    def finish(self) -> list[str]:
        """Name the shards as transformers expects; write the index when there are several."""
        self.flush()
        n = len(self.parts)
        if n == 1:
            self.parts[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, (path, tensors) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update({t: name for t in tensors})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        _write_json(self.folder / "model.safetensors.index.json", index)
        return [*names, "model.safetensors.index.json"]


@dataclass
class Folder:
    """What :func:`write_folder` wrote (relative file names, sizes)."""

    path: Path
    files: list[str]
    bytes: int
    tensor_bytes: int


def write_folder(
    tmp: Path,
    source: Checkpoint,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    *,
    recipe: dict[str, Any] | None = None,
) -> Folder:
    """Into the temporary folder ``tmp`` (from :func:`qtool.io.atomic_dir`): the tensors as
    safetensors shards (with an index when there are several), ``config.json``, the source's
    tokenizer and generation files, and the recipe that made it (``recipe.json``). Callers add
    their own files (model card, quantize_config.json) after it."""
    shards = _Shards(tmp, MAX_SHARD_BYTES)
    try:
        for name, t in tensors:
            shards.add(name, t)
        shard_files = shards.finish()
    finally:
        shards.discard()
    _write_json(tmp / "config.json", config)
    _copy_side_files(source.root, tmp)
    if recipe is not None:
        _write_json(tmp / "recipe.json", recipe)
    tensor_bytes = sum((tmp / f).stat().st_size for f in shard_files if f.endswith(".safetensors"))
    return Folder(tmp, shard_files, 0, tensor_bytes)


def folder_files(tmp: Path) -> tuple[list[str], int]:
    files = sorted(p.name for p in tmp.iterdir())
    return files, sum((tmp / f).stat().st_size for f in files)


def _write_into(req: WriteRequest, fmt: str, tmp: Path, out: Path) -> WriteResult:
    from qtool import __version__
    from qtool.formats import compressed, gptq

    src = req.source
    ct_layout = compressed.layout(req.activations is not None)
    act_order = False
    quantized = set(req.weights)

    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        nonlocal act_order
        names = list(src.tensors)
        # RTN quantizes inside the weight loaders, so this is the progress of the whole run
        for name in req.reporter.track(names, f"writing {out.name}", len(names)):
            module, _, suffix = name.rpartition(".")
            if suffix == "weight" and module in quantized:
                qw = req.weights[module]()
                if qw.shape != tuple(src.tensors[name].shape):
                    raise BadInputError(
                        f"{module}: quantized shape {qw.shape} differs from the source's "
                        f"{tuple(src.tensors[name].shape)}"
                    )
                if not isinstance(qw, QuantizedWeight) or qw.scheme != req.scheme:
                    raise BadInputError(f"{module}: quantized on another grid than the request")
                if fmt == "gptq":
                    parts = gptq.pack_weight(qw)
                    act_order = act_order or gptq.has_act_order(qw)
                else:
                    parts = compressed.pack_weight(qw, ct_layout)
                    acts = req.activations
                    if acts is not None and not acts.dynamic:
                        scale = float((acts.input_scales or {})[module])
                        parts["input_scale"] = torch.tensor([scale], dtype=torch.float32)
                del qw
                for sfx, t in parts.items():
                    yield f"{module}.{sfx}", t
            elif name in req.float_overrides:
                yield name, req.float_overrides[name]()
            else:
                yield name, src.read(name)

    config = {k: v for k, v in src.config.items() if k != "quantization_config"}
    config["quantization_config"] = {}  # filled once the tensors are written (act-order seen)
    folder = write_folder(tmp, src, tensors(), config, recipe=req.recipe)
    if fmt == "gptq":
        desc_act = act_order or bool(req.gptq.get("desc_act", False))
        qcfg = gptq.quantization_config(
            req.scheme, desc_act=desc_act, gptq=req.gptq, version=__version__
        )
        (tmp / "quantize_config.json").write_text(gptq.quantize_config_json(qcfg))
    else:
        ignore = _unquantized_linears(src, quantized)
        qcfg = compressed.quantization_config(req.scheme, ct_layout, req.activations, ignore)
    config["quantization_config"] = qcfg
    _write_json(tmp / "config.json", config)

    quality = req.measure(tmp) if req.measure is not None else None
    footprint = _footprint(src)
    params = _params(src, footprint)
    result = WriteResult(
        path=out,
        files=[],
        bytes=0,
        tensor_bytes=folder.tensor_bytes,
        params=params,
        bits_per_weight=8 * folder.tensor_bytes / params if params else 0.0,
        quantization_config=qcfg,
        quality=quality,
        footprint=footprint,
    )
    from qtool.formats.card import model_card

    (tmp / "README.md").write_text(model_card(req, fmt, result, desc_act=_desc_act(qcfg)))
    result.files, result.bytes = folder_files(tmp)
    return result


def _desc_act(qcfg: dict[str, Any]) -> bool:
    return bool(qcfg.get("desc_act", False))


def _unquantized_linears(src: Checkpoint, quantized: set[str]) -> list[str]:
    """Modules with a 2-D weight left in float (``lm_head`` always: a tied head is a Linear in
    the model even without a tensor), excluding embeddings, which are not ``Linear``."""
    ignore = {"lm_head"}
    for name, info in src.tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix != "weight" or len(info.shape) != 2 or module in quantized:
            continue
        if "embed" in module.split(".")[-1] or module.endswith(("wte", "wpe")):
            continue
        ignore.add(module)
    return sorted(ignore)


def _copy_side_files(root: Path, dst: Path) -> None:
    names = [n for n in COPIED_FILES if (root / n).is_file()]
    for pattern in COPIED_GLOBS:
        names += [p.name for p in sorted(root.glob(pattern)) if p.is_file()]
    for n in names:
        shutil.copyfile(root / n, dst / n)


def _footprint(src: Checkpoint) -> dict[str, Any] | None:
    from qtool.footprint import build_report

    try:
        return build_report(src).as_dict()
    except (QToolError, ValueError, KeyError, TypeError):  # an architecture the report lacks
        return None


def _params(src: Checkpoint, footprint: dict[str, Any] | None) -> int:
    if footprint is not None:
        return int(footprint["params"]["total"])
    return sum(t.numel for t in src.tensors.values())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
