"""Methods: how codes are chosen on a grid. Each declares what it needs and which grids it
takes; the pipeline (:mod:`qtool.pipeline`) runs them tensor by tensor.

- ``rtn``: round-to-nearest with the grid's fit (clipping on integer grids, llama.cpp's own
  search on GGUF blocks, weighted by calibration statistics when there are some); any grid.
- ``gptq``: GPTQ's error feedback on any grid, layer by layer over calibration data; decoder
  linears only (it needs their input Hessians).
- ``bitnet``: absmean ternary / sign binary weights; the ternary and binary grids and GGUF's
  TQ1_0 / TQ2_0; decoder linears only.
- transform ``smoothquant`` (:mod:`.smoothquant`): rewrites weights and norms before a method.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    needs: str  # "nothing", "hessian" (a calibration pass), "statistics"
    grids: tuple[str, ...]  # grid kinds it can choose codes on
    linears_only: bool  # only decoder linears (embeddings and head fall back to rtn)
    summary: str


METHODS: dict[str, MethodInfo] = {
    "rtn": MethodInfo(
        "rtn", "nothing", ("int", "gguf", "ternary", "binary"), False, "round-to-nearest"
    ),
    "gptq": MethodInfo(
        "gptq", "hessian", ("int", "gguf", "ternary", "binary"), True, "GPTQ error feedback"
    ),
    "bitnet": MethodInfo("bitnet", "nothing", ("ternary", "binary", "gguf"), True, "BitNet"),
}
