"""compressed-tensors checkpoint layouts, as the ``compressed-tensors`` package (0.20) writes and
reads them; transformers loads them (CPU included), vLLM serves them.

``pack-quantized`` (weight-only, W4A16 / W8A16 / any width 1-8), per quantized linear
(``compressors/pack_quantized/base.py`` ``PackedQuantizationCompressor.compress``):

==================  ===============================  ========================================
tensor              dtype / shape                    content
==================  ===============================  ========================================
weight_packed       int32 ``[out, ceil(in*b/32)]``   codes packed along the input dim
weight_scale        float32 ``[out, G]``              ``[out, 1]`` channel, ``[1]`` tensor
weight_zero_point   int32 ``[ceil(out*b/32), G]``    asym group/channel only: packed along dim 0
weight_shape        int64 ``[2]``                    ``[out, in]``
==================  ===============================  ========================================

``int-quantized`` (W8A8, ``compressors/naive_quantized/base.py``): ``weight`` int8 ``[out, in]``
signed, ``weight_scale``, ``weight_zero_point`` int8 (asym only), and ``input_scale`` float32
``[1]`` for static per-tensor activations (dynamic per-token activations store nothing).

Value conventions (``quantization/lifecycle/forward.py``, ``quantization/utils/helpers.py``):
compressed-tensors' integer range is signed ``[-2^(b-1), 2^(b-1) - 1]`` and dequantizes
``(q - zp) * scale``. qtool's codes are unsigned with zero ``z``, so ``q = code - 2^(b-1)`` and
``zp = z - 2^(b-1)`` (0 for symmetric schemes, which store no zero point). The packer adds
``2^(b-1)`` back before packing (``pack_to_int32``), so the packed fields hold qtool's code and
zero exactly. What cannot be represented is refused: act-order ``g_idx`` (the package removed
``actorder: group`` in 0.20; ``weight`` ordering needs no ``g_idx``) and widths outside 1-8.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from qtool.errors import BadInputError
from qtool.formats.gptq import has_act_order
from qtool.formats.packing import pack_rows
from qtool.grids.affine import QuantizedWeight, QuantScheme

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"


def package_version() -> str:
    """The installed compressed-tensors version written to the config (0.20.0 if absent)."""
    try:
        return version("compressed-tensors")
    except PackageNotFoundError:
        return "0.20.0"


def layout(has_activations: bool) -> str:
    """``int-quantized`` when input activations are quantized (W8A8), else ``pack-quantized``."""
    return INT_QUANTIZED if has_activations else PACK_QUANTIZED


def check_scheme(scheme: QuantScheme, activation_bits: int | None) -> None:
    """Refuse what the compressed-tensors layouts cannot store, before any work."""
    if activation_bits is not None and activation_bits != 8:
        raise BadInputError(
            f"activation bits {activation_bits}: compressed-tensors int-quantized stores int8 "
            "activations only",
            hint="use 8-bit activations (W8A8)",
        )


def _strategy(scheme: QuantScheme) -> str:
    return {"group": "group", "channel": "channel", "tensor": "tensor"}[scheme.granularity]


def _scale(qw: QuantizedWeight) -> torch.Tensor:
    """``weight_scale`` as float32. The values are exact in the scheme's (16-bit) scale dtype,
    but compressed-tensors dequantizes in the *stored* scale dtype (``_dequantize``:
    ``x_q.to(scale.dtype) * scale``, which transformers' ``dequantize=True`` load runs on the
    file's tensors): float16 scales would round ``(q - zp) * scale`` to float16, float32 keeps
    it exact. The cost is 2 bytes per group (+0.25 bits/weight at group 64)."""
    s = qw.scale.to(torch.float32)
    if qw.scheme.granularity == "tensor":
        return s[:1, 0].contiguous()  # one value, shape [1]
    return s.contiguous()


def _signed(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes/zeros -> compressed-tensors' signed values, as int8."""
    return (x.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _check_weight(qw: QuantizedWeight) -> None:
    if has_act_order(qw):
        raise BadInputError(
            f"{qw.name}: act-order g_idx cannot be stored in compressed-tensors "
            f"{package_version()} (its 'actorder: group' was removed)",
            hint="use --format gptq for act-order, or quantize without act-order",
        )
    if qw.scheme.granularity == "tensor" and not bool((qw.scale == qw.scale[0, 0]).all()):
        raise BadInputError(f"{qw.name}: tensor granularity with more than one scale")


def pack_weight(qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear (suffix -> tensor) in layout ``fmt``."""
    _check_weight(qw)
    bits, sym = qw.scheme.bits, qw.scheme.sym
    out: dict[str, torch.Tensor] = {}
    if fmt == PACK_QUANTIZED:
        out["weight_packed"] = pack_rows(qw.codes, bits)
        out["weight_scale"] = _scale(qw)
        out["weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
        if not sym:
            if qw.scheme.granularity == "tensor":
                out["weight_zero_point"] = _signed(qw.zero[:1, 0], bits)
            else:  # packed along the output dim (pack_to_int32(..., packed_dim=0))
                out["weight_zero_point"] = pack_rows(qw.zero.t(), bits).t().contiguous()
        return out
    out["weight"] = _signed(qw.codes, bits).contiguous()
    out["weight_scale"] = _scale(qw)
    if not sym:
        z = qw.zero[:1, 0] if qw.scheme.granularity == "tensor" else qw.zero
        out["weight_zero_point"] = _signed(z, bits).contiguous()
    return out


def _args(bits: int, sym: bool, strategy: str, group: int | None, dynamic: bool) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": strategy,
        "group_size": group,
        "dynamic": dynamic,
    }


def quantization_config(
    scheme: QuantScheme, fmt: str, activations: Any, ignore: list[str]
) -> dict[str, Any]:
    """The ``quantization_config`` of config.json (``ModelCompressor.update_config``'s shape:
    one config group targeting ``Linear``, the unquantized linears in ``ignore``)."""
    group = scheme.group_size if scheme.granularity == "group" else None
    weights = _args(scheme.bits, scheme.sym, _strategy(scheme), group, False)
    inputs = None
    if activations is not None:
        if activations.dynamic:
            inputs = _args(8, True, "token", None, True)
        else:
            inputs = _args(8, True, "tensor", None, False)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": package_version(),
    }
