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

Everything else is copied unchanged. Tensors stream one at a time through the shared folder
writer (:func:`qtool.formats.folder.write_folder`): built in a temporary folder beside the
target, renamed when complete, removed on any failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, UnsupportedError
from qtool.events import SILENT, Reporter
from qtool.grids.ternary import BinaryWeight, TernaryWeight

Variant = Literal["ternary", "binary"]
VALUES_PER_BYTE = 4


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


def _tensors(
    ckpt: Checkpoint,
    weights: dict[str, Callable[[], Any]],
    reporter: Reporter,
    label: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) to write, in checkpoint order, one source tensor read at a time."""
    names = list(ckpt.tensors)
    for name in reporter.track(names, f"writing {label}", len(names)):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module not in weights:
            yield name, ckpt.read(name)
            continue
        qw = weights[module]()
        if isinstance(qw, BinaryWeight):
            yield name, qw.dequantize(ST_DTYPES.get(ckpt.tensors[name].dtype, torch.bfloat16))
            continue
        if not isinstance(qw, TernaryWeight):
            raise AssertionError(f"{name}: expected ternary codes, got {type(qw).__name__}")
        yield name, pack_ternary(qw.codes)
        inv = 1.0 / qw.gamma if qw.gamma > 0 else 1.0  # an all-zero weight: t = 0 anyway
        yield module + ".weight_scale", torch.tensor([inv], dtype=torch.float32)


def check(ckpt: Checkpoint, modules: list[str], variant: Variant) -> None:
    """What transformers' BitNet layout cannot hold, refused before any work."""
    if ckpt.config.get("model_type") != "llama":
        raise UnsupportedError(
            f"{ckpt.source}: model type {ckpt.config.get('model_type')!r}; BitNet safetensors "
            "export handles llama checkpoints",
            hint="write a TQ1_0/TQ2_0 GGUF instead (--format gguf)",
        )
    if "quantization_config" in ckpt.config:
        raise UnsupportedError(f"{ckpt.source}: the checkpoint is already quantized")
    if variant == "ternary":
        for m in modules:
            out = ckpt.tensors[m + ".weight"].shape[0]
            if out % VALUES_PER_BYTE:
                raise UnsupportedError(
                    f"{m}.weight: {out} output rows; transformers' BitLinear packs 4 rows a byte",
                    hint="BitNet safetensors export needs output sizes that are multiples of 4",
                )


ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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


def write_bitnet_checkpoint(
    ckpt: Checkpoint,
    tmp: Path,
    weights: dict[str, Callable[[], Any]],
    variant: Variant = "ternary",
    *,
    recipe: dict[str, Any] | None = None,
    reporter: Reporter = SILENT,
    label: str = "",
) -> None:
    """Write ``ckpt`` with its decoder linears ``weights`` (module -> lazy Ternary/BinaryWeight)
    as a BitNet checkpoint into the temporary folder ``tmp`` (from :func:`qtool.io.atomic_dir`)."""
    from qtool.formats.folder import write_folder

    if variant not in ("ternary", "binary"):
        raise BadInputError(f"BitNet variant {variant!r}: use ternary or binary")
    check(ckpt, list(weights), variant)
    write_folder(
        tmp,
        ckpt,
        _tensors(ckpt, weights, reporter, label or tmp.name),
        _config(ckpt, variant),
        recipe=recipe,
    )
    if variant == "binary":
        dtype = str(
            ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "the source dtype"
        )
        (tmp / "README.md").write_text(_CARD.format(name=label or tmp.name, dtype=dtype))
