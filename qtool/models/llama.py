"""Llama and Mistral (llama.cpp arch ``llama``), Llama 3.x rope scaling included.

llama.cpp's converter (``conversion/llama.py``, ``LlamaModel``): the rows of ``q_proj`` and
``k_proj`` (weights and biases) are permuted per head from HF's rotate-half RoPE layout to the
interleaved one llama.cpp's RoPE uses (``LlamaModel.permute``; K with the KV-head count);
``rope_type: llama3`` adds a generated ``rope_freqs.weight`` of ``head_dim / 2`` frequency
factors (``generate_extra_tensors``, byte for byte) and no rope-scaling keys; ``vocab_size``
and ``rope.dimension_count`` are written. Llama 3's tokenizer is named ``llama-bpe`` by the
converter's check-text hash, which :mod:`qtool.formats.gguf_vocab` shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

from qtool.models.base import Family, GGUFTensor


def permute_qk(w: Any, n_head: int) -> Any:
    """HF stores each head's rotary pairs as (first half, second half); llama.cpp's RoPE wants
    them interleaved. Rows of each head go from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...].
    Works on any array with rows first (floats, or encoded block rows)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: Any, n_head: int) -> Any:
    """Inverse of :func:`permute_qk`: per head, rows (half, 2) back to (2, half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> list[float]:
    """The ``rope_freqs`` factors of Llama 3.1's frequency-dependent scaling, as llama.cpp's
    converter computes them (``LlamaModel.generate_extra_tensors``): 1 for short wavelengths,
    ``factor`` for long ones, a smooth blend in between.

    Byte-identical to the converter: the rotary frequencies come from torch's float32 ``pow``
    (vectorised, not correctly rounded, as transformers' and the converter's RoPE compute them)
    and every later step is a float32 operation (torch evaluates ``s / t`` as
    ``(1 / t) * s``)."""
    import numpy as np
    import torch

    f32 = np.float32
    base = float(rope.get("rope_theta") or 10000.0)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    freqs = (1.0 / (base**exponent)).numpy()
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = f32(old_ctx / low), f32(old_ctx / high)
    out = []
    for f in freqs:
        wavelen = (f32(1.0) / f) * f32(2 * math.pi)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = ((f32(1.0) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
            out.append(float(f32(1.0) / ((f32(1.0) - smooth) / f32(factor) + smooth)))
    return out


# Llama 3.1+ "llama3" RoPE parameters as every released Llama 3.x checkpoint has them
# (low_freq_factor, high_freq_factor, original_max_position_embeddings); the factor is read
# from the file when a GGUF's rope_freqs is turned back into HF parameters.
LLAMA3_ROPE_CANDIDATES = ((1.0, 4.0, 8192),)


class Llama(Family):
    hf_types: ClassVar[tuple[str, ...]] = ("llama", "mistral")
    gguf_arch = "llama"
    extra_rope_types: ClassVar[tuple[str, ...]] = ("llama3",)
    gguf_runtime_tensors: ClassVar[tuple[str, ...]] = ("rope_freqs.weight",)

    def write_gguf_metadata(self, w: Any) -> None:
        super().write_gguf_metadata(w)
        w.add_vocab_size(int(self.get("vocab_size")))
        w.add_rope_dimension_count(self.head_dim)

    def generated_tensors(self) -> list[GGUFTensor]:
        if self.rope_type != "llama3":
            return []
        rope, head_dim = self.rope, self.head_dim

        def build(_inputs: list[Any]) -> Iterator[Any]:
            import numpy as np

            yield np.asarray(llama3_rope_factors(rope, head_dim), dtype=np.float32)

        return [GGUFTensor("rope_freqs.weight", (head_dim // 2,), (), build, float_only=True)]

    def _heads(self, hf_name: str) -> int | None:
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return self.n_head
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return self.n_head_kv
        return None

    def rows_independent(self, hf_name: str) -> bool:
        return self._heads(hf_name) is None

    def to_gguf(self, hf_name: str, t: Any) -> Any:
        n = self._heads(hf_name)
        return t if n is None else permute_qk(t, n)

    def from_gguf(self, hf_name: str, t: Any) -> Any:
        n = self._heads(hf_name)
        return t if n is None else unpermute_qk(t, n)

    def gguf_config_extras(
        self, cfg: Any, gguf: Any, rope: dict[str, Any], key: Any, put: Any
    ) -> dict[str, Any]:
        rope = super().gguf_config_extras(cfg, gguf, rope, key, put)
        head_dim = key("attention.key_length")
        if head_dim is not None:  # transformers takes head_dim from rope.dimension_count
            put("head_dim", int(head_dim))
        if "rope_freqs.weight" in gguf.tensors:
            rope = llama3_rope_from_factors(gguf, rope, int(head_dim or cfg.head_dim))
        if cfg.model_type == "mistral":
            # llama.cpp runs a "llama" GGUF with full attention (no sliding window), while
            # MistralConfig defaults to a 4096-token window.
            put("sliding_window", None)
        return rope


def llama3_rope_from_factors(gguf: Any, rope: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """HF's "llama3" rope_parameters that give a GGUF's rope_freqs exactly (the inverse of
    :meth:`Llama.generated_tensors`). transformers' GGUF config drops the tensor, so the model
    would run with plain RoPE; the factor is the largest entry, the other parameters come from
    :data:`LLAMA3_ROPE_CANDIDATES` and are kept only if they reproduce every entry, so an
    unknown variant is refused rather than approximated."""
    import numpy as np

    from qtool.errors import UnsupportedError
    from qtool.gguf_meta import read_gguf_tensor

    factors = read_gguf_tensor(gguf, "rope_freqs.weight").reshape(-1)
    theta = float(rope.get("rope_theta") or 10000.0)
    if factors.size == head_dim // 2 and np.all(factors == 1.0):
        return rope  # neutral factors: plain RoPE
    factor = float(factors.max())
    for low, high, orig in LLAMA3_ROPE_CANDIDATES:
        if factors.size != head_dim // 2:
            break
        cand = {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": orig,
        }
        expect = np.asarray(llama3_rope_factors(cand, head_dim), dtype=np.float32)
        if np.allclose(expect, factors, rtol=1e-6, atol=0.0):
            return cand
    raise UnsupportedError(
        f"{gguf.source}: its RoPE frequency factors (rope_freqs) match no Llama 3 RoPE "
        "configuration qtool knows",
        hint="use the original Hugging Face checkpoint of this model",
    )
