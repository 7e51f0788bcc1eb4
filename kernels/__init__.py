"""Numeric hot paths: GGUF block codecs (imported as ``qtool.kernels``).

``quantize(rows, qtype, imatrix)`` gives the exact bytes llama.cpp's ``ggml_quantize_chunk``
writes for the type (with or without an importance matrix); ``dequantize`` inverts it like
llama.cpp's ``to_float``; ``block_affine`` / ``block_codes`` / ``block_with_codes`` read and
rewrite the integer codes under the bytes, keeping llama.cpp's scales. One codec class per
type, in one file per family.
"""

from qtool.kernels.api import (
    block_affine,
    block_codes,
    block_with_codes,
    codec_for,
    dequantize,
    quantize,
    quantize_part,
    row_sigma2,
)
from qtool.kernels.codec import Codec, CodecInputError
from qtool.kernels.types import BY_ID, QK, QK_K, QUANT_TYPES, QuantType, get_type

__all__ = [
    "BY_ID",
    "QK",
    "QK_K",
    "QUANT_TYPES",
    "Codec",
    "CodecInputError",
    "QuantType",
    "block_affine",
    "block_codes",
    "block_with_codes",
    "codec_for",
    "dequantize",
    "get_type",
    "quantize",
    "quantize_part",
    "row_sigma2",
]
