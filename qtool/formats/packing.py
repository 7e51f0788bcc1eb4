"""Dense little-endian bit packing of unsigned codes into int32 words.

Both checkpoint formats qtool writes use the same bit order: value ``k`` of a run of 32 values
occupies bits ``k*b .. k*b+b-1`` of a ``32*b``-bit little-endian stream, i.e. of ``b`` int32
words (value bits low first; a value may straddle two words)::

    b = 4:  word 0 = v7 v6 v5 v4 v3 v2 v1 v0       (v0 in bits 0-3)
    b = 3:  word 0 = v10[1:0] v9 .. v1 v0          (v0 in bits 0-2, v10's low 2 bits at 30-31)
            word 1 = v21[0] v20 .. v11 v10[2]      (v10's high bit at bit 0)
            word 2 = v31 .. v22 v21[2:1]

- GPTQ v1 (AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`` ``QuantLinear.pack``):
  for 2/4/8 bits ``qweight[row] |= intweight[j] << (bits * (j - i))``; its 3-bit branch writes 10
  values, splits the 11th over two words (``<< 30`` / ``>> 2``), and so on: the same stream.
- compressed-tensors (``compressors/pack_quantized/helpers.py`` ``pack_to_int32``): value ``i``
  at global bit ``i * num_bits`` after adding the offset ``2^(b-1)`` to the signed value, i.e.
  exactly qtool's unsigned code.
"""

from __future__ import annotations

import math

import torch

_MASK32 = (1 << 32) - 1


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of unsigned ``codes`` ``[rows, n]`` (each < 2^bits) into int32
    words ``[rows, ceil(n * bits / 32)]``. ``n`` is zero-padded to a multiple of 32 first."""
    rows, n = codes.shape
    padded = math.ceil(n / 32) * 32
    v = torch.zeros(rows, padded, dtype=torch.int64)
    v[:, :n] = codes.to(torch.int64)
    v = v.reshape(rows, padded // 32, 32)
    words = torch.zeros(rows, padded // 32, bits, dtype=torch.int64)
    for k in range(32):
        pos = k * bits
        word, off = divmod(pos, 32)
        words[:, :, word] |= (v[:, :, k] << off) & _MASK32
        if off + bits > 32:  # straddles: the high bits go to the bottom of the next word
            words[:, :, word + 1] |= v[:, :, k] >> (32 - off)
    flat = words.reshape(rows, -1)[:, : math.ceil(n * bits / 32)]
    return _to_int32(flat)


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[rows, words]`` -> int64 codes ``[rows, n]``."""
    rows = words.shape[0]
    w = words.to(torch.int64) & _MASK32
    groups = math.ceil(n / 32)
    full = torch.zeros(rows, groups * bits, dtype=torch.int64)
    full[:, : w.shape[1]] = w
    full = full.reshape(rows, groups, bits)
    out = torch.zeros(rows, groups, 32, dtype=torch.int64)
    maxq = (1 << bits) - 1
    for k in range(32):
        word, off = divmod(k * bits, 32)
        val = full[:, :, word] >> off
        if off + bits > 32:
            val = val | (full[:, :, word + 1] << (32 - off))
        out[:, :, k] = val & maxq
    return out.reshape(rows, groups * 32)[:, :n]


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32).contiguous()
