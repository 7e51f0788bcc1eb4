"""BitNet safetensors checkpoints: the transformers ``bitnet`` layout (b1.58), or dense 1-bit.

**Ternary** (``variant="ternary"``) writes what transformers' ``BitNetHfQuantizer`` loads with
``linear_class: "bitlinear"`` and ``quantization_mode: "offline"``
(``transformers/integrations/bitnet.py``): each decoder linear weight ``[out, in]`` becomes

- ``weight``: uint8 ``[out / 4, in]``, four ternary rows per byte row. Output row ``j * out/4 + r``
  sits in bits ``2j..2j+1`` of byte row ``r``, stored as ``t + 1`` (0, 1, 2) (the layout of
  ``pack_weights`` / ``unpack_weights`` there);
- ``weight_scale``: float32 ``[1]`` holding ``1 / gamma``: ``BitLinear.forward`` *divides* the
  integer product by ``weight_scale * input_scale``, so the layer computes
  ``x_q @ t.T / (input_scale / gamma)``, i.e. the weight ``gamma * t`` on 8-bit absmax
  per-token activations.

**Binary** (``variant="binary"``): no loader has a 1-bit format (transformers' ``bitnet``
quantizer is ternary only), so the weights are stored dense in the source dtype, holding exactly
``beta * Sign(W - alpha)`` (two values per tensor), with no ``quantization_config`` (any loader
runs it as an ordinary model); ``config.json`` marks it under ``qtool_quantization`` and a
README says so.

Everything else is copied unchanged. Tensors stream one at a time into a single
``model.safetensors`` written header-first; the checkpoint is built in a temporary folder beside
the target and renamed when complete, and removed on any failure.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, OutputError, UnsupportedError
from qtool.quantize.bitnet import binarize, is_decoder_linear, ternarize

Variant = Literal["ternary", "binary"]
VALUES_PER_BYTE = 4
# Files copied beside the weights: tokenizer, generation config, chat templates.
_COPY_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
_NO_COPY = ("config.json", "model.safetensors.index.json")
_ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
}


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 ternary codes ``[out, in]`` -> uint8 ``[out / 4, in]`` in transformers' BitNet
    layout (see the module docstring)."""
    out = codes.shape[0]
    if out % VALUES_PER_BYTE:
        raise UnsupportedError(
            f"a BitNet weight with {out} output rows: transformers' BitLinear packs 4 rows per "
            "byte and needs a multiple of 4"
        )
    r = out // VALUES_PER_BYTE
    shifted = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((r, *codes.shape[1:]), dtype=torch.uint8)
    for j in range(VALUES_PER_BYTE):
        packed |= shifted[j * r : (j + 1) * r] << (2 * j)
    return packed


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_ternary`: int8 codes ``[4 * rows, in]``."""
    parts = [((packed >> (2 * j)) & 3).to(torch.int8) - 1 for j in range(VALUES_PER_BYTE)]
    return torch.cat(parts, dim=0)


def _tensors(ckpt: Checkpoint, variant: Variant) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) to write, in checkpoint order, one source tensor read at a time."""
    for name, info in ckpt.tensors.items():
        w = ckpt.read(name)
        if not is_decoder_linear(name, len(info.shape)):
            yield name, w
            continue
        if variant == "binary":
            yield name, binarize(name, w).dequantize(w.dtype)
            continue
        tw = ternarize(name, w)
        yield name, pack_ternary(tw.codes)
        inv = 1.0 / tw.gamma if tw.gamma > 0 else 1.0  # an all-zero weight: t = 0 anyway
        yield (
            name.removesuffix(".weight") + ".weight_scale",
            torch.tensor([inv], dtype=torch.float32),
        )


def _planned(ckpt: Checkpoint, variant: Variant) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every output tensor, known before any data."""
    rows: list[tuple[str, str, tuple[int, ...]]] = []
    for name, info in ckpt.tensors.items():
        if variant == "ternary" and is_decoder_linear(name, len(info.shape)):
            out, cols = info.shape
            if out % VALUES_PER_BYTE:
                raise UnsupportedError(
                    f"{name}: {out} output rows; transformers' BitLinear packs 4 rows per byte",
                    hint="BitNet safetensors export needs output sizes that are multiples of 4",
                )
            rows.append((name, "U8", (out // VALUES_PER_BYTE, cols)))
            rows.append((name.removesuffix(".weight") + ".weight_scale", "F32", (1,)))
        else:
            rows.append((name, info.dtype, tuple(info.shape)))
    return rows


_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "F64": 8}


def _write_safetensors(path: Path, ckpt: Checkpoint, variant: Variant) -> None:
    """Header first (offsets from the plan), then each tensor's bytes as it is produced."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    plan = _planned(ckpt, variant)
    for name, dtype, shape in plan:
        if dtype not in _BYTES:
            raise UnsupportedError(f"{name}: safetensors dtype {dtype} is not handled")
        n = _BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, dtype, shape), (got, t) in zip(plan, _tensors(ckpt, variant), strict=True):
            t = t.contiguous()
            if got != name or _ST_DTYPE.get(t.dtype) != dtype or tuple(t.shape) != shape:
                raise AssertionError(f"{got}: produced {t.dtype} {tuple(t.shape)}, planned {name}")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        f.flush()
        os.fsync(f.fileno())


def _config(ckpt: Checkpoint, variant: Variant) -> dict[str, Any]:
    config = dict(ckpt.config)
    if variant == "ternary":
        config["quantization_config"] = {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline",
            "modules_to_not_convert": ["lm_head"],
            "use_rms_norm": False,
        }
    else:
        config["qtool_quantization"] = {
            "method": "bitnet-1bit",
            "reference": "Wang et al. 2023, BitNet",
            "storage": "dense",
            "weights": "beta * Sign(W - alpha) per decoder linear weight, stored dense",
        }
    return config


_CARD = """# {name} (BitNet 1-bit, dense)

Written by qtool. Every decoder-layer linear weight holds exactly `beta * Sign(W - alpha)`
(Wang et al. 2023, "BitNet": `alpha = mean(W)`, `beta = mean(|W|)`, `Sign(0) = -1`): two values
per tensor. No standard loader has a 1-bit weight format, so they are stored dense in {dtype}
and the model loads as an ordinary checkpoint; activations are not quantized.
"""


def write_bitnet_checkpoint(ckpt: Checkpoint, out_dir: Path, variant: Variant = "ternary") -> Path:
    """Write ``ckpt`` (a Llama safetensors checkpoint) as a BitNet checkpoint in ``out_dir``."""
    if ckpt.format != "safetensors":
        raise UnsupportedError(f"{ckpt.source}: BitNet export reads safetensors checkpoints")
    if ckpt.config.get("model_type") != "llama":
        raise UnsupportedError(
            f"{ckpt.source}: model type {ckpt.config.get('model_type')!r}; BitNet safetensors "
            "export handles llama checkpoints",
        )
    if "quantization_config" in ckpt.config:
        raise UnsupportedError(f"{ckpt.source}: the checkpoint is already quantized")
    if variant not in ("ternary", "binary"):
        raise BadInputError(f"BitNet variant {variant!r}: use ternary or binary")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        raise BadInputError(f"{out_dir}: already exists", hint="remove it or choose another path")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise BadInputError(f"{out_dir}: the folder {parent} does not exist", hint="create it")
    _planned(ckpt, variant)  # shape errors before any work
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise OutputError(f"{out_dir}: could not create ({e.strerror or e})") from e
    try:
        _write_safetensors(tmp / "model.safetensors", ckpt, variant)
        (tmp / "config.json").write_text(json.dumps(_config(ckpt, variant), indent=2) + "\n")
        for f in sorted(ckpt.root.iterdir()):
            if f.is_file() and f.suffix in _COPY_SUFFIXES and f.name not in _NO_COPY:
                shutil.copy2(f, tmp / f.name)
        if variant == "binary":
            dtype = str(
                ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "the source dtype"
            )
            (tmp / "README.md").write_text(_CARD.format(name=out_dir.name, dtype=dtype))
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{out_dir}: could not write ({e.strerror or e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
