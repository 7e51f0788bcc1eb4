"""BitNet's quantizers as a method: absmean ternary (b1.58) or sign (1-bit) codes for the
decoder linears (the papers quantize those; embeddings, head and norms keep their precision).

On the ternary/binary grids this is the grid's own round-to-nearest (:mod:`qtool.grids.ternary`).
On GGUF's TQ1_0/TQ2_0 the weight is first ternarized with one ``gamma`` per tensor, then encoded:
the TQ codec stores each 256-block's ``d = max |x|``, which is ``fp16(gamma)`` whenever the block
holds a non-zero code, and the trits exactly.
"""

from __future__ import annotations

import torch

from qtool.errors import BadInputError
from qtool.grids.base import Grid, QuantizedTensor
from qtool.grids.ternary import ternarize

TQ_TYPES = ("TQ1_0", "TQ2_0")


def bitnet_quantize(name: str, w: torch.Tensor, grid: Grid) -> QuantizedTensor:
    """BitNet quantization of one decoder linear weight on ``grid``."""
    if grid.kind in ("ternary", "binary"):
        return grid.rtn(name, w)
    if grid.kind == "gguf" and grid.key in TQ_TYPES:
        return grid.rtn(name, ternarize(name, w).dequantize())
    raise BadInputError(
        f"{name}: BitNet writes ternary weights, not {grid.key}",
        hint="use a TQ1_0/TQ2_0 GGUF or the bitnet safetensors format",
    )
