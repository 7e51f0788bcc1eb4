"""transformers' MXFP4 checkpoint layout (``quant_method: mxfp4``): gpt-oss as OpenAI releases it.

Each layer's fused experts are written as the release stores them:

- ``mlp.experts.gate_up_proj_blocks`` uint8 ``[E, 2F, H/32, 16]`` and ``gate_up_proj_scales``
  uint8 ``[E, 2F, H/32]``: output-major, gate and up interleaved along the ``2F`` outputs
  (gate ``0::2``, up ``1::2``), two E2M1 codes a byte (weight ``2b`` in the low nibble);
- ``mlp.experts.down_proj_blocks`` ``[E, H, F/32, 16]`` and ``down_proj_scales``;

every other tensor (attention, router, expert biases, embeddings, norms, head) as the source
stores it, which ``modules_to_not_convert`` tells transformers. The values are ggml's
``block_mxfp4`` (:mod:`qtool.kernels.fp4`: RTN is llama.cpp's ``quantize_row_mxfp4_ref``; GPTQ
chooses codes on the same exponents), re-laid from ggml's pairing to the release's by
:func:`qtool.kernels.fp4.ggml_to_hf`. transformers loads the folder with its Mxfp4 quantizer:
decoded to bf16 on a CPU, or swizzled for its triton kernels on a GPU.

One fused tensor is held at a time (its codes: a quarter of its bf16 bytes); the folder is
written by the shared folder writer, atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError
from qtool.events import SILENT, Reporter

# the release's list: the experts are the only MXFP4 modules
NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def quantization_config() -> dict[str, Any]:
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(NOT_CONVERTED)}


def expert_arrays(
    fused: Any, weights: dict[str, Callable[[], Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """One fused tensor's ``(blocks, scales)`` in the release's layout from its experts' lazy
    MXFP4 weights (:class:`qtool.grids.gguf.GGUFWeight`, ``[rows, cols]`` each)."""
    from qtool.kernels.fp4 import ggml_to_hf

    nb = fused.cols // 32
    blocks = np.empty((fused.n_expert, fused.rows, nb, 16), np.uint8)
    scales = np.empty((fused.n_expert, fused.rows, nb), np.uint8)
    k = len(fused.roles)
    for e in range(fused.n_expert):
        for j, module in enumerate(fused.modules(e)):
            w = weights[module]()
            if w.qtype != "MXFP4" or w.shape != (fused.rows // k, fused.cols):
                raise BadInputError(
                    f"{module}: quantized as {w.qtype} {w.shape}, expected MXFP4 "
                    f"{(fused.rows // k, fused.cols)}"
                )
            b, s = ggml_to_hf(w.data)
            blocks[e, j::k], scales[e, j::k] = b, s  # gate 0::2, up 1::2
    return blocks, scales


def write_mxfp4(
    src: Checkpoint,
    path: Path,
    fused: Iterable[Any],
    weights: dict[str, Callable[[], Any]],
    *,
    card: dict[str, Any] | None = None,
    measure: Callable[[Path], dict[str, Any]] | None = None,
    recipe: dict[str, Any] | None = None,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Write ``src`` with its ``fused`` expert tensors (the family's
    :class:`~qtool.models.gpt_oss.FusedExperts`) quantized to MXFP4 as ``weights`` gives each
    expert's linear, everything else copied; returns the output's data for the report."""
    import torch

    from qtool.formats.folder import folder_files, write_folder
    from qtool.io import atomic_dir

    by_name = {f.name: f for f in fused}
    names = list(src.tensors)
    params = 0

    def tensors() -> Iterable[tuple[str, Any]]:
        nonlocal params
        for name in reporter.track(names, f"writing {path.name}", len(names)):
            f = by_name.get(name)
            if f is None:
                t = src.read(name)
                params += t.numel()
                yield name, t
                continue
            blocks, scales = expert_arrays(f, weights)
            params += blocks.size * 2
            yield f"{f.prefix}.{f.proj}_blocks", torch.from_numpy(blocks)
            yield f"{f.prefix}.{f.proj}_scales", torch.from_numpy(scales)

    config = dict(src.config)
    config["quantization_config"] = quantization_config()
    quality: dict[str, Any] = {}
    with atomic_dir(path) as tmp:
        folder = write_folder(tmp, src, tensors(), config, recipe=recipe)
        if measure is not None:
            quality = measure(tmp)
        (tmp / "README.md").write_text(_card(path.name, card or {}, quality, folder.tensor_bytes))
        files, nbytes = folder_files(tmp)
    out: dict[str, Any] = {
        "format": "mxfp4",
        "path": str(path),
        "experts": sorted(by_name),
        "params": params,
        "bytes": nbytes,
        "tensor_bytes": folder.tensor_bytes,
        "files": files,
    }
    if quality:
        out["quality"] = quality
    return out


def _card(name: str, card: dict[str, Any], quality: dict[str, Any], tensor_bytes: int) -> str:
    lines = [
        f"# {name}",
        "",
        f"MXFP4 experts written by qtool from `{card.get('source', '?')}`: every MoE expert's "
        "weights as E2M1 codes with one power-of-two (E8M0) scale per 32 weights, in "
        "transformers' MXFP4 layout (`quant_method: mxfp4`); attention, router, expert biases, "
        "embeddings and head as the source stores them.",
        "",
        f"- tensors: {tensor_bytes / 2**20:.1f} MiB",
        "- methods (expert projections): "
        + ", ".join(f"{k} {v}" for k, v in sorted((card.get("methods") or {}).items())),
    ]
    if card.get("dataset"):
        lines.append(
            f"- calibration: {card['dataset']}, {card.get('samples')} x {card.get('seq_len')} "
            "tokens"
        )
    for k, v in quality.items():
        lines.append(f"- {k}: {v}")
    lines += [
        "",
        "transformers decodes the experts to bf16 on a CPU "
        "(`AutoModelForCausalLM.from_pretrained(path)`) and runs them on its MXFP4 kernels on a "
        "GPU.",
        "",
    ]
    return "\n".join(lines)
