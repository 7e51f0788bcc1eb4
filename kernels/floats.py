"""Unquantized float types: F32, F16, BF16 (one value per "block", no importance matrix)."""

from __future__ import annotations

import numpy as np
from qtool.kernels.codec import Codec


# F32, 4 bytes per value: | f32 little endian |          (plain copy)
class F32(Codec, type_name="F32"):
    """float32, little endian: ``[f32]`` -- a plain copy."""

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, "<f4").view(np.uint8)

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(q).view("<f4").astype(np.float32)


# F16, 2 bytes per value: | sign:1 | exponent:5 | mantissa:10 | little endian
# Matches ggml_fp32_to_fp16_row / ggml_fp16_to_fp32_row.
class F16(Codec, type_name="F16"):
    """IEEE binary16, little endian: ``[sign:1 | exp:5 | mantissa:10]``.

    Matches ``ggml_fp32_to_fp16_row``: round to nearest even, overflow to infinity, subnormals
    kept (numpy's float16 cast is exactly that).
    """

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        return x.astype("<f2").view(np.uint8)

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(q).view("<f2").astype(np.float32)


# BF16, 2 bytes per value: | sign:1 | exponent:8 | mantissa:7 | little endian (top of an f32)
# Matches ggml_fp32_to_bf16_row_ref / ggml_bf16_to_fp32_row.
class BF16(Codec, type_name="BF16"):
    """bfloat16, little endian: ``[sign:1 | exp:8 | mantissa:7]``, the top half of a float32.

    Matches ``ggml_fp32_to_bf16_row_ref``: add 0x7fff plus the lowest kept bit, then truncate
    (round to nearest even; overflow rounds to infinity). NaN never reaches it (inputs are
    checked finite).
    """

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        u = np.ascontiguousarray(x, np.float32).view(np.uint32)
        h = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        return h.astype("<u2").view(np.uint8)

    def dequantize_blocks(self, q: np.ndarray) -> np.ndarray:
        h = np.ascontiguousarray(q).view("<u2").astype(np.uint32)
        return (h << 16).view(np.float32)
