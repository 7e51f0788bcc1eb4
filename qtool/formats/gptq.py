"""The GPTQ v1 checkpoint layout (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``, what
transformers' GPTQ integration loads), and qtool's own unpacker for it.

Per quantized ``nn.Linear`` ``W [out, in]`` with ``b`` bits and ``G`` groups:

=========  ===========================  ===================================================
tensor     dtype / shape                content
=========  ===========================  ===================================================
qweight    int32 ``[in * b / 32, out]``  codes packed along the *input* dim, low bits first
qzeros     int32 ``[G, out * b / 32]``   ``zero - 1`` packed along the *output* dim (v1)
scales     float16 ``[G, out]``          one scale per group and output channel
g_idx      int32 ``[in]``                group of each input column (act-order: any order)
bias       as stored                     unchanged
=========  ===========================  ===================================================

``w[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))`` (AutoGPTQ
``qlinear_cuda_old.py``: ``pack`` writes ``zeros -= 1``; the kernels and ``dequantize_weight``
add the 1 back). The packing itself is :mod:`.packing` (AutoGPTQ's ``pack`` loops, 3-bit
interleave included, produce that dense stream).

Choices:

- bits 2, 3, 4, 8 only (the GPTQ kernels' ``bits in [2, 3, 4, 8]``); other widths are refused
  with a pointer to compressed-tensors, which packs any width 1-8.
- tensor granularity is written as channel (``group_size: -1``): the one shared scale is
  repeated on every output channel, which is exact, so the file decodes to the same weights.
- v1 stores ``zero - 1`` in ``b`` bits, so an asymmetric zero point of 0 (a group with no
  negative weight) cannot be stored; such a weight is refused (a sym scheme or
  compressed-tensors stores it).
- scales must be exactly representable in float16 (qtool's default ``scale_dtype``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch

from qtool.errors import BadInputError, CorruptFileError
from qtool.formats.packing import pack_rows, unpack_rows
from qtool.grids.affine import QuantizedWeight, QuantScheme

SUPPORTED_BITS = (2, 3, 4, 8)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def check_scheme(scheme: QuantScheme) -> None:
    """Refuse what the GPTQ v1 layout cannot store, before any work."""
    if scheme.bits not in SUPPORTED_BITS:
        raise BadInputError(
            f"--bits {scheme.bits}: the GPTQ format stores 2, 3, 4 or 8 bits only",
            hint="use --format compressed-tensors (pack-quantized stores any width 2-8), or "
            "--bits 2/3/4/8",
        )


def group_size(scheme: QuantScheme) -> int:
    """The ``group_size`` written to the config: -1 for channel (and tensor) granularity."""
    return scheme.group_size if scheme.granularity == "group" else -1


def pack_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one quantized weight (suffix -> tensor)."""
    scheme = qw.scheme
    check_scheme(scheme)
    bits = scheme.bits
    out_f, in_f = qw.shape
    if in_f % 32 or out_f % (32 if bits == 3 else 32 // bits):
        raise BadInputError(
            f"{qw.name}: shape {out_f}x{in_f} does not fit the GPTQ packing (input size a "
            "multiple of 32, output size a multiple of 32 / bits)",
            hint="use --format compressed-tensors, or leave this layer unquantized",
        )
    scales16 = qw.scale.to(torch.float16)
    if not torch.equal(scales16.to(torch.float32), qw.scale.to(torch.float32)):
        raise BadInputError(
            f"{qw.name}: scales are not exactly representable in float16, which GPTQ stores",
            hint="quantize with the default scale dtype float16",
        )
    if not scheme.sym and bool((qw.zero == 0).any()):
        raise BadInputError(
            f"{qw.name}: an asymmetric zero point of 0 cannot be stored in GPTQ v1 (it stores "
            "zero - 1)",
            hint="use --sym, or --format compressed-tensors for asymmetric weights",
        )
    # qweight: codes transposed to [in, out]; pack along the input dim = rows of codes.T, i.e.
    # pack each output row's inputs, then transpose the words back to [in*b/32, out].
    qweight = pack_rows(qw.codes, bits).t().contiguous()
    # qzeros: [G, out] of (zero - 1), packed along the output dim.
    qzeros = pack_rows((qw.zero.to(torch.int64) - 1).t(), bits)
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scales16.t().contiguous(),
        "g_idx": qw.group_index().to(torch.int32).contiguous(),
    }


def has_act_order(qw: QuantizedWeight) -> bool:
    """Whether the weight's ``g_idx`` differs from the natural ``column // group_size``."""
    if qw.g_idx is None:
        return False
    natural = QuantizedWeight(qw.name, qw.codes, qw.scale, qw.zero, qw.scheme).group_index()
    return not torch.equal(qw.g_idx.long(), natural)


def quantization_config(
    scheme: QuantScheme, *, desc_act: bool, gptq: dict[str, Any], version: str
) -> dict[str, Any]:
    """``quantization_config`` (config.json) and quantize_config.json content."""
    return {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": group_size(scheme),
        "desc_act": desc_act,
        "sym": scheme.sym,
        "static_groups": bool(gptq.get("static_groups", False)),
        "damp_percent": float(gptq.get("damp_percent", 0.01)),
        "true_sequential": bool(gptq.get("true_sequential", True)),
        "lm_head": False,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": [f"qtool:{version}"]},
    }


def unpack_weight(t: dict[str, torch.Tensor], bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight of one GPTQ v1 linear (``qweight``, ``qzeros``,
    ``scales``, optional ``g_idx``), computed in float32 then cast to ``dtype``."""
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    in_f = qweight.shape[0] * 32 // bits
    out_f = scales.shape[1]
    codes = unpack_rows(qweight.t().contiguous(), bits, in_f)  # [out, in]
    zeros = unpack_rows(qzeros, bits, out_f) + 1  # [G, out]
    g = t.get("g_idx")
    if g is None:
        g_idx = torch.arange(in_f) // (in_f // scales.shape[0])
    else:
        g_idx = g.long()
    s = scales.to(torch.float32).t()[:, g_idx]  # [out, in]
    z = zeros.t()[:, g_idx].to(torch.float32)
    return ((codes.to(torch.float32) - z) * s).to(dtype)


def dense_tensors(
    names: list[str], read: Any, config: dict[str, Any], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of the dense model of a GPTQ checkpoint: every quantized linear
    unpacked to ``<module>.weight`` (``dtype``), the other tensors read as stored (floats cast
    to ``dtype``). ``read(name)`` returns one stored tensor."""
    q = config.get("quantization_config") or {}
    if str(q.get("checkpoint_format", "gptq")).lower() != "gptq":
        raise CorruptFileError(
            f"GPTQ checkpoint_format {q.get('checkpoint_format')!r} is not supported by qtool's "
            "unpacker (v1 'gptq' only)"
        )
    bits = int(q.get("bits", 0))
    if bits not in SUPPORTED_BITS:
        raise CorruptFileError(f"GPTQ config: bits {q.get('bits')!r} is not 2, 3, 4 or 8")
    modules = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
    if not modules:
        raise CorruptFileError(
            "the config says GPTQ but the checkpoint has no .qweight tensors",
            hint="the quantization_config does not match the tensors",
        )
    for name in names:
        mod, _, suffix = name.rpartition(".")
        if mod in modules and suffix in SUFFIXES:
            if suffix == "qweight":
                parts = {s: read(f"{mod}.{s}") for s in SUFFIXES if f"{mod}.{s}" in names}
                yield f"{mod}.weight", unpack_weight(parts, bits, dtype)
            continue
        t = read(name)
        yield name, t.to(dtype) if t.is_floating_point() else t


def quantize_config_json(qcfg: dict[str, Any]) -> str:
    """quantize_config.json as AutoGPTQ / GPTQModel read it (the same fields)."""
    return json.dumps(qcfg, indent=2) + "\n"
