"""Dense safetensors: an HF checkpoint of float weights, e.g. a GGUF file converted back.

For a GGUF source the tensors come from :class:`qtool.models.gguf_view.GGUFView` (decoded
exactly, HF layout), the config and tokenizer from transformers' GGUF support; the folder is
written by the shared folder writer (:func:`qtool.formats.folder.write_folder`), atomically.
``dtype="auto"``: a float32 file stays float32, float16 stays float16, anything quantized or
bfloat16 becomes bfloat16 (the dequantized values of a k-quant need more range than float16's
safe margin and more precision than they carry; bfloat16 is what the originals mostly were).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.checkpoint import Checkpoint
from qtool.events import SILENT, Reporter

DTYPES = ("float32", "float16", "bfloat16")


def auto_dtype(ckpt: Checkpoint) -> str:
    types = {str(t.dtype) for t in ckpt.tensors.values() if len(t.shape) > 1}
    if ckpt.format == "gguf":
        types = {
            str(t.dtype) for t in getattr(ckpt, "gguf", ckpt).tensors.values() if len(t.shape) > 1
        }
        if types <= {"F32"}:
            return "float32"
        if types <= {"F16"}:
            return "float16"
        return "bfloat16"
    mapping = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return mapping.get(next(iter(types), "BF16"), "bfloat16") if len(types) == 1 else "bfloat16"


def write_dense(
    src: Checkpoint,
    path: Path,
    dtype: str = "auto",
    *,
    family: Any,
    recipe: dict[str, Any] | None = None,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """``family``: how to read the checkpoint as floats (:meth:`qtool.models.Family.
    float_tensors`: every tensor as stored, gpt-oss's MXFP4 experts decoded)."""
    import torch

    from qtool.formats.folder import folder_files, write_folder
    from qtool.io import atomic_dir
    from qtool.models.gguf_view import view_notes

    name = auto_dtype(src) if dtype == "auto" else dtype
    tdtype = getattr(torch, name)
    params = 0

    views = family.float_tensors(src.tensors, src.read)

    def tensors() -> Any:
        nonlocal params
        for v in reporter.track(views, f"writing {path.name}", len(views)):
            t = v.read()
            params += t.numel()
            yield v.name, t.to(tdtype) if t.is_floating_point() else t

    config = {
        k: v for k, v in src.config.items() if k not in ("quantization_config", "torch_dtype")
    }
    config["dtype"] = name
    with atomic_dir(path) as tmp:
        folder = write_folder(tmp, src, tensors(), config, recipe=recipe)
        files, nbytes = folder_files(tmp)
    notes = view_notes(src.root) if src.format == "gguf" else {}
    return {
        "format": "safetensors",
        "path": str(path),
        "dtype": name,
        "architecture": (config.get("architectures") or [None])[0],
        "tied_embeddings": bool(config.get("tie_word_embeddings")),
        "tensors": len(views),
        "params": params,
        "config_added": notes.get("config_added", {}),
        "tokenizer": notes.get("tokenizer", {}),
        "bytes": nbytes,
        "tensor_bytes": folder.tensor_bytes,
        "files": files,
    }
