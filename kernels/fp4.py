"""The microscaling FP4 block type: MXFP4 (OCP Microscaling Formats v1.0, ggml ``block_mxfp4``).

32 weights share one power-of-two scale stored as an E8M0 exponent; each weight is an E2M1 code
(sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives). ggml
stores the code values doubled (``kvalues_mxfp4``: 0..12) and halves the scale
(``GGML_E8M0_TO_FP32_HALF``), which decodes to the same floats.

The encoder matches ``quantize_row_mxfp4_ref`` (``ggml-quants.c``): ``e = floor(log2(amax)) - 2
+ 127`` (the block's largest magnitude lands in [4, 8) times the half scale, i.e. on the top
codes), then each weight takes the nearest code, the first one on ties (``best_index_mxfp4``).
llama.cpp's ``quantize_mxfp4`` ignores the importance matrix, and so does this codec. The
decoder matches ``dequantize_row_mxfp4``.

MXFP4 is not an affine grid (the codes are not evenly spaced), so it has no ``affine`` view;
it is a *table* grid instead: :meth:`MXFP4.table` gives each block's 16 representable values
(indexed by the 4-bit code), :meth:`MXFP4.codes` / :meth:`MXFP4.with_codes` read and write the
codes, keeping the exponent. GPTQ chooses codes on that table (``qtool.grids.gguf``).
"""

from __future__ import annotations

import numpy as np
from qtool.kernels._numeric import F32
from qtool.kernels.codec import Codec
from qtool.kernels.types import QK

# kvalues_mxfp4: the E2M1 values doubled, indexed by the 4-bit code (bit 3 is the sign)
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
# the E2M1 values themselves, as OCP and transformers' FP4_VALUES list them: code 8 is -0.0
# (ggml's int8 table decodes it to +0.0; the same number)
E2M1_VALUES = np.copysign(np.abs(KVALUES.astype(F32)) / F32(2), (np.arange(16) < 8) - 0.5)
E2M1_VALUES = E2M1_VALUES.astype(F32)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """``GGML_E8M0_TO_FP32_HALF``: 2^(e - 128) as float32, built from its bits (the two
    smallest exponents as the subnormals 2^-129 and 2^-128 ... exactly as ggml does)."""
    e = np.asarray(e, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def e8m0_exponent(amax: np.ndarray) -> np.ndarray:
    """The block exponent ``(uint8)(floorf(log2f(amax)) - 2 + 127)``, 0 for an all-zero block.

    ``log2f`` is evaluated in float64 and rounded to float32 (a correctly rounded ``log2f``),
    and the C conversion to ``uint8_t`` wraps modulo 256 as it does on the platforms llama.cpp
    runs on (only reachable for blocks below 2^-125)."""
    with np.errstate(divide="ignore"):
        lg = np.log2(amax.astype(np.float64)).astype(F32)
    e = np.floor(lg).astype(np.float64) - 2 + 127
    e = np.where(amax > 0, e, 0.0)
    return (e.astype(np.int64) & 0xFF).astype(np.uint8)


# MXFP4, 17 bytes: | e: uint8 (E8M0) | qs[16]: byte j = code[j] | code[j + 16] << 4 |
#                  x[j] = kvalues_mxfp4[code[j]] * 2^(e - 128)
# Matches quantize_row_mxfp4_ref / dequantize_row_mxfp4.
class MXFP4(Codec, type_name="MXFP4"):
    """E8M0 block exponent + 32 E2M1 codes (low nibbles: weights 0..15, high: 16..31)."""

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        amax = np.abs(x).max(axis=1)
        e = e8m0_exponent(amax)
        d = e8m0_half(e)
        grid = KVALUES.astype(F32)[None, None, :] * d[:, None, None]  # exact: d is 2^k
        err = np.abs(grid - x[:, :, None])
        code = np.argmin(err, axis=2).astype(np.uint8)  # first minimum, as the C loop keeps it
        qs = (code[:, :16] & 0x0F) | (code[:, 16:] << 4)
        return np.concatenate([e[:, None], qs], axis=1)

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        d = e8m0_half(q[:, 0])[:, None]
        qs = q[:, 1 : 1 + QK // 2]
        lo = KVALUES[qs & 0x0F].astype(F32) * d
        hi = KVALUES[qs >> 4].astype(F32) * d
        return np.concatenate([lo, hi], axis=1)

    # the table grid under the bytes
    table_size = len(KVALUES)

    def table(self, q: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, 17) -> float32 (n_blocks, 16): the value each code decodes to."""
        return KVALUES.astype(F32)[None, :] * e8m0_half(q[:, 0])[:, None]

    def codes(self, q: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, 17) -> int32 (n_blocks, 32): the stored 4-bit codes."""
        qs = q[:, 1:]
        return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)

    def with_codes(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """A copy of ``q`` holding ``codes`` (0..15, (n_blocks, 32)); the exponent is kept."""
        c = np.asarray(codes)
        if (
            c.shape != (q.shape[0], QK)
            or c.dtype.kind not in "iu"
            or c.size
            and (c.min() < 0 or c.max() > 15)
        ):
            raise ValueError(f"MXFP4 codes must be integers 0..15 of shape {(q.shape[0], QK)}")
        c = c.astype(np.uint8)
        out = q.copy()
        out[:, 1:] = (c[:, :16] & 0x0F) | (c[:, 16:] << 4)
        return out


def hf_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 as OpenAI's checkpoints store it -> ggml ``block_mxfp4`` bytes, value for value.

    ``blocks``: uint8 ``(..., n_blocks, 16)``, byte ``b`` holding weight ``2b`` in its low nibble
    and weight ``2b + 1`` in its high one (transformers' ``convert_moe_packed_tensors``);
    ``scales``: uint8 ``(..., n_blocks)``, the E8M0 exponent (weight = E2M1 value * 2^(s-127)).
    Returns uint8 ``(..., n_blocks * 17)``: the same codes regrouped as ggml pairs them
    (weight ``j`` with weight ``j + 16``) after the same exponent (ggml's half scale times
    its doubled values is the same power of two), as llama.cpp's converter repacks them
    (``GptOssModel.repack_mxfp4``)."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != QK // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    codes = np.empty((*blocks.shape[:-1], QK), np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate([scales[..., None], qs], axis=-1)
    return out.reshape(*blocks.shape[:-2], -1)


def hf_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI's MXFP4 (see :func:`hf_to_ggml`) -> float32 ``(..., n_blocks * 32)``: every
    weight is its E2M1 value times 2^(scale - 127), exact in float32 for every scale but 255
    (E8M0's NaN), as transformers' ``convert_moe_packed_tensors`` decodes it (code 8: -0.0)."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != QK // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    out = np.empty((*blocks.shape[:-1], QK), F32)
    out[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    out[..., 1::2] = E2M1_VALUES[blocks >> 4]
    with np.errstate(over="ignore"):  # 6 * 2^127 is inf, as in transformers and ggml
        out = np.ldexp(out, scales.astype(np.int32)[..., None] - 127).astype(F32)
    return out.reshape(*blocks.shape[:-2], -1)


def ggml_to_hf(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``block_mxfp4`` rows -> OpenAI's layout, the inverse of :func:`hf_to_ggml`.

    ``data``: uint8 ``(..., n_blocks * 17)``. Returns ``blocks`` uint8 ``(..., n_blocks, 16)``
    (weight ``2b`` in the low nibble of byte ``b``, ``2b + 1`` in the high one) and ``scales``
    uint8 ``(..., n_blocks)`` (the E8M0 exponents, unchanged: ggml's half scale times its doubled
    values is the same power of two)."""
    data = np.asarray(data, dtype=np.uint8)
    if data.shape[-1] % (1 + QK // 2):
        raise ValueError(f"MXFP4 rows of {data.shape[-1]} bytes are not whole 17-byte blocks")
    q = data.reshape(*data.shape[:-1], -1, 1 + QK // 2)
    qs = q[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # weight j: code[j], j = 0..31
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, np.ascontiguousarray(q[..., 0])
