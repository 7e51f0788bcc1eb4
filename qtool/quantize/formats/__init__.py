"""Write a quantized checkpoint folder (GPTQ v1 or compressed-tensors), streamed and atomically.

:func:`write_checkpoint` reads the source tensors one at a time, calls each quantized weight's
loader one at a time, and writes safetensors shards of at most ``MAX_SHARD_BYTES``; it never
holds the whole model. Everything goes to a temporary sibling folder that replaces ``out_dir``
only once complete (config, tokenizer, shards, index, model card); any failure removes it.

The per-format tensor layouts live in :mod:`.gptq` and :mod:`.compressed`, the bit packing
both share in :mod:`.packing`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, OutputError, QToolError
from qtool.output import get_output
from qtool.quantize.scheme import QuantizedWeight, QuantScheme

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
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except PermissionError as e:
        raise BadInputError(
            f"{out}: {out.parent} is not writable", hint="choose another output folder"
        ) from e
    except OSError as e:
        raise _output_error(out, e) from e
    try:
        with _os_errors(out):
            result = _write_into(req, fmt, tmp, out)
            _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.path = out
    return result


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_request(req: WriteRequest) -> str:
    from qtool.quantize.formats import compressed, gptq

    fmt = req.format.lower()
    if fmt not in FORMATS:
        raise BadInputError(f"--format {req.format}: unknown", hint=f"use {' or '.join(FORMATS)}")
    if req.source.format != "safetensors":
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
    out = Path(req.out_dir).expanduser()
    parent = out.resolve().parent
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: exists and is not a folder", hint="choose a folder name")
    if not parent.is_dir():
        raise BadInputError(f"{out}: the folder {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"{out}: {parent} is not writable", hint="choose another output folder")
    return fmt


@contextmanager
def _os_errors(out: Path) -> Iterator[None]:
    """OSError (and safetensors' write errors) -> OutputError, one line."""
    try:
        yield
    except QToolError:
        raise
    except OSError as e:
        raise _output_error(out, e) from e
    except Exception as e:  # safetensors raises its own error type for I/O failures
        if "No space left" in str(e):
            raise OutputError(f"{out}: no space left on device", hint="free space and retry") from e
        raise


def _output_error(out: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{out}: no space left on device", hint="free space and retry")
    return OutputError(f"{out}: could not write ({e.strerror or e})")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


class _Shards:
    """Accumulates tensors and writes a safetensors shard whenever ``limit`` bytes are reached."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.limit:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f"part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

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


def _write_into(req: WriteRequest, fmt: str, tmp: Path, out: Path) -> WriteResult:
    from qtool import __version__
    from qtool.quantize.formats import compressed, gptq

    src = req.source
    shards = _Shards(tmp, MAX_SHARD_BYTES)
    ct_layout = compressed.layout(req.activations is not None)
    act_order = False
    quantized = set(req.weights)
    names = list(src.tensors)
    # RTN quantizes inside the weight loaders, so this is the progress of the whole run
    for name in get_output().track(names, f"quantizing and writing {out.name}", len(names)):
        module, _, suffix = name.rpartition(".")
        if suffix == "weight" and module in quantized:
            qw = req.weights[module]()
            if qw.shape != tuple(src.tensors[name].shape):
                raise BadInputError(
                    f"{module}: quantized shape {qw.shape} differs from the source's "
                    f"{tuple(src.tensors[name].shape)}"
                )
            if qw.scheme != req.scheme:
                raise BadInputError(f"{module}: quantized with another scheme than the request")
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
                shards.add(f"{module}.{sfx}", t)
        elif name in req.float_overrides:
            shards.add(name, req.float_overrides[name]())
        else:
            shards.add(name, src.read(name))
    shard_files = shards.finish()

    if fmt == "gptq":
        desc_act = act_order or bool(req.gptq.get("desc_act", False))
        qcfg = gptq.quantization_config(
            req.scheme, desc_act=desc_act, gptq=req.gptq, version=__version__
        )
        (tmp / "quantize_config.json").write_text(gptq.quantize_config_json(qcfg))
    else:
        ignore = _unquantized_linears(src, quantized)
        qcfg = compressed.quantization_config(req.scheme, ct_layout, req.activations, ignore)
    config = {k: v for k, v in src.config.items() if k != "quantization_config"}
    config["quantization_config"] = qcfg
    _write_json(tmp / "config.json", config)
    _copy_side_files(src.root, tmp)

    quality = req.measure(tmp) if req.measure is not None else None
    footprint = _footprint(src)
    params = _params(src, footprint)
    tensor_bytes = sum((tmp / f).stat().st_size for f in shard_files if f.endswith(".safetensors"))
    result = WriteResult(
        path=out,
        files=[],
        bytes=0,
        tensor_bytes=tensor_bytes,
        params=params,
        bits_per_weight=8 * tensor_bytes / params if params else 0.0,
        quantization_config=qcfg,
        quality=quality,
        footprint=footprint,
    )
    from qtool.quantize.formats.card import model_card

    (tmp / "README.md").write_text(model_card(req, fmt, result, desc_act=_desc_act(qcfg)))
    files = sorted(p.name for p in tmp.iterdir())
    result.files = files
    result.bytes = sum((tmp / f).stat().st_size for f in files)
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


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` goes only after that works."""
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    os.chmod(tmp, 0o755)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)  # put the previous output back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
