"""The GGUF tensor types qtool reads and writes: one table, block layouts written as sums.

Layouts follow llama.cpp's ``ggml-common.h`` (``block_q4_K`` etc.); the ids are the
``ggml_type`` enum values that GGUF files store. ``block_size`` is weights per block and
``type_size`` bytes per block, so a row of ``n`` weights takes ``n // block_size * type_size``
bytes. Each codec module cites the reference function it must match byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_id: int
    block_size: int  # weights per block
    type_size: int  # bytes per block
    reference: str  # the llama.cpp function the encoder matches

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        if n % self.block_size:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of {self.block_size}")
        return n // self.block_size * self.type_size


QK = 32  # weights per block of the legacy types
QK_K = 256  # weights per super-block of the k-quants and ternary types
_F16 = 2  # one fp16 scale

_TABLE = [
    QuantType("F32", 0, 1, 4, "plain float32"),
    QuantType("F16", 1, 1, 2, "ggml_fp32_to_fp16_row"),
    QuantType("BF16", 30, 1, 2, "ggml_fp32_to_bf16_row_ref"),
    # d + 32 int8
    QuantType("Q8_0", 8, QK, _F16 + QK, "quantize_row_q8_0_ref"),
    # d + 16 bytes of nibbles
    QuantType("Q4_0", 2, QK, _F16 + QK // 2, "quantize_row_q4_0_ref"),
    # d + m + 16 bytes of nibbles
    QuantType("Q4_1", 3, QK, _F16 + _F16 + QK // 2, "quantize_row_q4_1_ref"),
    # d + 4 bytes of high bits + 16 bytes of nibbles
    QuantType("Q5_0", 6, QK, _F16 + 4 + QK // 2, "quantize_row_q5_0_ref"),
    # d + m + 4 bytes of high bits + 16 bytes of nibbles
    QuantType("Q5_1", 7, QK, _F16 + _F16 + 4 + QK // 2, "quantize_row_q5_1_ref"),
    # 16 bytes of 4-bit scales|mins + 64 bytes of 2-bit quants + d + dmin
    QuantType("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + _F16 + _F16, "quantize_row_q2_K_ref"),
    # 32 bytes of high bits + 64 bytes of 2-bit quants + 12 bytes of 6-bit scales + d
    QuantType("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + _F16, "quantize_row_q3_K_ref"),
    # d + dmin + 12 bytes of 6-bit scales|mins + 128 bytes of nibbles
    QuantType("Q4_K", 12, QK_K, _F16 + _F16 + 12 + QK_K // 2, "quantize_row_q4_K_ref"),
    # d + dmin + 12 bytes of scales|mins + 32 bytes of high bits + 128 bytes of nibbles
    QuantType("Q5_K", 13, QK_K, _F16 + _F16 + 12 + QK_K // 8 + QK_K // 2, "quantize_row_q5_K_ref"),
    # 128 bytes of low nibbles + 64 bytes of high 2 bits + 16 int8 scales + d
    QuantType("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + _F16, "quantize_row_q6_K_ref"),
    # 48 bytes of base-3 packed trits (5 a byte) + 4 bytes (4 a byte) + d
    QuantType(
        "TQ1_0",
        34,
        QK_K,
        (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + _F16,
        "quantize_row_tq1_0_ref",
    ),
    # 64 bytes of 2-bit trits + d
    QuantType("TQ2_0", 35, QK_K, QK_K // 4 + _F16, "quantize_row_tq2_0_ref"),
    # E8M0 exponent + 16 bytes of E2M1 nibbles
    QuantType("MXFP4", 39, QK, 1 + QK // 2, "quantize_row_mxfp4_ref"),
]

QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in _TABLE}
BY_ID: dict[int, QuantType] = {t.ggml_id: t for t in _TABLE}


def get_type(name: str) -> QuantType:
    """Look a type up by name (case-insensitive), with an error listing the known ones."""
    try:
        return QUANT_TYPES[name.upper()]
    except KeyError:
        known = ", ".join(QUANT_TYPES)
        raise KeyError(f"unknown GGUF tensor type {name!r}; known types: {known}") from None
