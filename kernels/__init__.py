"""Numeric hot paths: GGUF block codecs (imported as ``qtool.kernels``)."""

from qtool.kernels.types import BY_ID, QK, QK_K, QUANT_TYPES, QuantType, get_type

__all__ = ["BY_ID", "QK", "QK_K", "QUANT_TYPES", "QuantType", "get_type"]
