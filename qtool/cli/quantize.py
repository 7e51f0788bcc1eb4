"""``qtool quantize`` (not implemented yet: tracked as issues 4 and 6)."""

from __future__ import annotations

from qtool.cli._pending import pending
from qtool.cli.options import Source


def quantize_cmd(src: Source) -> None:
    """[not implemented yet] Quantize weights: RTN, GPTQ, GGUF k-quants, BitNet."""
    raise pending("quantize", "issues 4 and 6")
