"""Decode a GGUF file's tensors exactly into a Hugging Face architecture's state dict.

The block bytes go through qtool's codecs (``qtool.kernels.dequantize``, bit-exact with
llama.cpp's ``to_float``), then the layout changes llama.cpp's converter made are undone, so
that the float weights are those llama.cpp multiplies with:

- Llama / Mistral: ``convert_hf_to_gguf.py`` (conversion/llama.py, ``LlamaModel.permute``)
  reorders the rows of ``q_proj``/``k_proj`` per head from HF's rotate-half RoPE layout to
  llama.cpp's interleaved one; the inverse reshape/swap is applied here (transformers'
  ``LlamaTensorProcessor._reverse_permute_weights`` does the same).
- Gemma 3: the converter (conversion/gemma.py, ``Gemma3Model.norm_shift``) stores every
  ``*norm.weight`` as ``w + 1`` because ``Gemma3RMSNorm`` multiplies by ``1 + w``; 1 is
  subtracted back (transformers' ``Gemma2TensorProcessor``).
- Qwen 2/3 and Phi-3 tensors are stored as they are.

Names are mapped by inverting :func:`qtool.arch.gguf_name` over the target model's own names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from qtool.arch import gguf_name
from qtool.checkpoint import Checkpoint
from qtool.errors import CorruptFileError, UnsupportedError

# model_type -> the converter transform family (see the module docstring).
PERMUTE_QK = {"llama", "mistral"}
NORM_PLUS_ONE = {"gemma3", "gemma3_text"}
AS_STORED = {"qwen2", "qwen3", "phi3"}
SUPPORTED = PERMUTE_QK | NORM_PLUS_ONE | AS_STORED

# GGUF tensors llama.cpp computes with that have no HF weight: HF derives them from the config.
RUNTIME_ONLY = ("rope_freqs.weight",)


def dequantize_rows(data: np.ndarray, qtype: str, n: int, name: str) -> np.ndarray:
    """GGUF block bytes (rows, row_bytes) -> float32 (rows, n), through qtool's codecs."""
    from qtool.kernels import CodecInputError, dequantize

    try:
        return dequantize(data, qtype, n, name=name)
    except CodecInputError as e:
        raise CorruptFileError(f"cannot decode GGUF tensor {name}: {e}") from e


def read_gguf_tensor(ckpt: Checkpoint, gguf_tensor: str) -> np.ndarray:
    """One GGUF tensor as float32 in PyTorch order, decoded from its block bytes."""
    info = ckpt.tensors[gguf_tensor]
    n = info.shape[-1]
    rows = info.numel // n
    if info.nbytes % rows:
        raise CorruptFileError(
            f"{info.file}: tensor {gguf_tensor} has {info.nbytes} bytes, not a whole number of "
            f"its {rows} rows",
            hint="re-download or re-export the file",
        )
    raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    data = np.asarray(raw).reshape(rows, info.nbytes // rows)
    return dequantize_rows(data, info.dtype, n, gguf_tensor).reshape(info.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute(w, n_head, n_head)``: per head, rows
    (2, half) -> (half, 2) back to HF's layout."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_names(
    ckpt: Checkpoint, hf_names: Iterable[str], model_type: str, n_layers: int
) -> dict[str, str]:
    """{GGUF tensor name: HF name} for every GGUF tensor; fails on a tensor the HF
    architecture has no place for."""
    inverse: dict[str, str] = {}
    for hf in hf_names:
        g = gguf_name(hf, model_type, n_layers)
        if g is not None:
            inverse.setdefault(g, hf)
    out: dict[str, str] = {}
    for g in ckpt.tensors:
        if g in RUNTIME_ONLY:
            continue
        if g not in inverse:
            raise UnsupportedError(
                f"{ckpt.source}: GGUF tensor {g} has no counterpart in the base architecture "
                f"({model_type}, {n_layers} layers)",
                hint="pass the --base model this GGUF was converted from",
            )
        out[g] = inverse[g]
    return out


def decode_state_dict(
    ckpt: Checkpoint,
    expected: dict[str, tuple[int, ...]],
    config: dict[str, Any],
    *,
    dtype: Any,
    tied: bool,
) -> dict[str, Any]:
    """Decode every tensor of a GGUF ``ckpt`` into HF names and layout.

    ``expected``: the target model's {HF name: shape}. ``config``: its HF config dict
    (model_type, heads). ``tied``: whether the output projection is the embedding (no
    ``output.weight`` in the file), in which case ``lm_head.weight`` is not expected.
    Returns {HF name: torch tensor of ``dtype``}.
    """
    import torch

    cfg = {**config, **(config.get("text_config") or {})}
    model_type = str(cfg.get("model_type"))
    if model_type not in SUPPORTED:
        raise UnsupportedError(
            f"{ckpt.source}: decoding GGUF into {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED))})",
            hint="use --backend llama.cpp to evaluate the file through llama.cpp",
        )
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    names = gguf_to_hf_names(ckpt, expected, model_type, n_layers)
    wanted = {k for k in expected if not (tied and k == "lm_head.weight")}
    missing = sorted(wanted - set(names.values()))
    if missing:
        raise UnsupportedError(
            f"{ckpt.source}: the GGUF file has no tensor for {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="pass the --base model this GGUF was converted from",
        )
    out: dict[str, Any] = {}
    for g, hf in names.items():
        w = read_gguf_tensor(ckpt, g)
        if model_type in PERMUTE_QK and hf.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif model_type in PERMUTE_QK and hf.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, n_kv)  # the converter permutes K with n_head_kv heads
        elif model_type in NORM_PLUS_ONE and hf.endswith("norm.weight"):
            w = w - np.float32(1.0)
        if tuple(w.shape) != tuple(expected[hf]):
            raise UnsupportedError(
                f"{ckpt.source}: GGUF tensor {g} has shape {tuple(w.shape)}, the base model's "
                f"{hf} has {tuple(expected[hf])}",
                hint="pass the --base model this GGUF was converted from",
            )
        out[hf] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    return out
