"""gpt-oss (llama.cpp arch ``gpt-oss``, ``LLM_ARCH_OPENAI_MOE``): OpenAI's open-weight MoE.

What differs from the other MoE families (transformers' ``modeling_gpt_oss.py``; llama.cpp's
``conversion/gpt_oss.py`` and ``src/models/openai-moe.cpp``):

- **Attention**: biases on q/k/v/o; one learned *sink* logit per head joins every softmax and
  is dropped after it (``self_attn.sinks`` -> ``attn_sinks.weight``, F32); layers alternate
  sliding-window (even layers, ``sliding_window`` tokens) and full attention; YaRN RoPE.
  transformers' sinks exist only in its eager attention, so the layer runner builds eager.
- **Experts**: all experts of a layer in one tensor, ``mlp.experts.gate_up_proj`` and
  ``down_proj``, with per-expert biases. Two layouts on disk:

  - float (what transformers saves): ``gate_up_proj`` ``[E, H, 2F]`` and ``down_proj``
    ``[E, F, H]``, *input-major* (``x @ W``, not ``nn.Linear``'s ``[out, in]``);
  - MXFP4 (OpenAI's release): ``gate_up_proj_blocks`` uint8 ``[E, 2F, H/32, 16]`` and
    ``gate_up_proj_scales`` uint8 ``[E, 2F, H/32]`` (output-major; see
    :func:`qtool.kernels.fp4.hf_decode`), ``down_proj_blocks`` ``[E, H, F/32, 16]`` ...

  gate and up are *interleaved* along the 2F outputs: gate = outputs ``0::2``, up = ``1::2``.
  llama.cpp's converter splits them into ``ffn_gate_exps`` / ``ffn_up_exps`` (and the biases
  into ``ffn_{gate,up}_exps.bias``), writes float experts in the requested type, and carries
  MXFP4 experts over as ``GGML_TYPE_MXFP4`` without dequantizing (``repack_mxfp4``); a float
  export of an MXFP4 checkpoint then records ``MOSTLY_MXFP4_MOE`` as its file type. Both are
  done here the same way (:meth:`GptOss.gguf_tensors`).
- **MLP**: router with a bias; softmax over the top-k router logits; the clamped SwiGLU
  ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, l)``.

llama.cpp hard-codes ``alpha = 1.702`` and ``limit = 7.0`` (``LLM_FFN_SWIGLU_OAI_MOE``), takes
layer ``i`` as sliding when ``i`` is even, needs every bias and a separate output head, and
always rounds the YaRN correction range to whole dimensions (``ggml_rope_yarn_corr_dims``)
where transformers follows ``truncate`` (false in the released configs): configs llama.cpp
would compute differently in any other way are refused (:meth:`GptOss.check_moe`); the
``truncate: false`` difference is llama.cpp's own for every released gpt-oss and is accepted
(README, "gpt-oss").
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from qtool.errors import UnsupportedError
from qtool.models.base import Family, FloatTensor, GGUFTensor
from qtool.models.moe import MoEFamily, MoESpec

# the experts of one layer, in either layout on disk
_EXPERTS = re.compile(
    r"^(?P<pre>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)"
    r"(?P<part>_blocks|_scales|_bias|\.weight|\.bias)?$"
)
# one expert's projection as the layer runner names its linears (no such tensor on disk)
_ONE_EXPERT = re.compile(
    r"^(?P<pre>(?:.*\.)?layers\.\d+\.mlp\.experts)\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>weight|bias)$"
)
SWIGLU_ALPHA = 1.702  # llama.cpp's constants (llama-graph.cpp, LLM_FFN_SWIGLU_OAI_MOE)
SWIGLU_LIMIT = 7.0
MXFP4_FILE_TYPE = 38  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE


@dataclasses.dataclass(frozen=True)
class FusedExperts:
    """One fused expert tensor of a layer: ``rows`` outputs (gate and up interleaved when
    ``roles`` has two) by ``cols`` inputs per expert; expert ``e``'s linears are
    :meth:`modules` (the layer runner's ``...experts.E.gate_proj`` ...)."""

    name: str  # on disk: ``model.layers.0.mlp.experts.gate_up_proj``
    prefix: str  # ``model.layers.0.mlp.experts``
    proj: str  # ``gate_up_proj`` | ``down_proj``
    n_expert: int
    rows: int
    cols: int
    roles: tuple[str, ...]

    def modules(self, e: int) -> list[str]:
        return [f"{self.prefix}.{e}.{r}" for r in self.roles]


class GptOss(MoEFamily):
    hf_types = ("gpt_oss",)
    gguf_arch = "gpt-oss"
    attn_implementation = "eager"  # the sinks live in transformers' eager attention only
    gguf_readable = False  # transformers has no GGUF reader for gpt-oss
    extra_rope_types = ("yarn",)
    # fused experts (MXFP4 or input-major) are no per-expert nn.Linear an integer safetensors
    # layout could hold as transformers reads them back: transformers' own MXFP4 layout holds them
    safetensors_outputs = ("mxfp4", "safetensors")
    router_names: ClassVar[tuple[str, ...]] = ("mlp.router",)

    @property
    def n_expert(self) -> int:
        return int(self.get("num_local_experts", "num_experts", default=0))

    @property
    def expert_ff(self) -> int:
        return int(self.get("intermediate_size"))

    @property
    def norm_topk(self) -> bool:
        return True  # softmax over the top-k logits == softmax, then renormalised over top-k

    @property
    def mxfp4(self) -> bool:
        """Whether the checkpoint declares MXFP4 experts (OpenAI's release)."""
        qc = self.cfg.get("quantization_config") or {}
        return qc.get("quant_method") == "mxfp4"

    def moe_spec(self) -> MoESpec | None:
        """The layer runner's block: one biased ``nn.Linear`` per expert projection, named
        ``mlp.experts.E.{gate,up,down}_proj`` (read through :meth:`virtual_reader`)."""
        spec = super().moe_spec()
        assert spec is not None
        return dataclasses.replace(
            spec,
            router="router",
            router_bias=True,
            expert_bias=True,
            topk_softmax=True,
            swiglu_limit=float(self.get("swiglu_limit", default=SWIGLU_LIMIT)),
            swiglu_alpha=float(self.get("swiglu_alpha", default=SWIGLU_ALPHA)),
            returns_scores=True,
        )

    def virtual_reader(
        self, name: str, tensors: Mapping[str, Any], read: Any, read_rows: Any
    ) -> Callable[[], Any] | None:
        """How to read one expert's projection (``...mlp.experts.3.gate_proj.weight``, the
        layer runner's ``nn.Linear`` layout ``[out, in]``, or its bias) from the fused tensors
        on disk: expert ``e``'s rows alone, gate/up de-interleaved, float experts transposed,
        MXFP4 experts decoded. None for any other name."""
        m = _ONE_EXPERT.match(name)
        if m is None:
            return None
        e, proj, kind = int(m["expert"]), m["proj"], m["kind"]
        fused = m["pre"] + (".down_proj" if proj == "down_proj" else ".gate_up_proj")
        half = {"gate_proj": 0, "up_proj": 1, "down_proj": None}[proj]

        def rows(n: str) -> Any:
            return read_rows(n, e, e + 1)[0] if read_rows is not None else read(n)[e]

        if kind == "bias":
            if fused + "_bias" not in tensors:
                return None
            return lambda: _half(rows(fused + "_bias"), half, 0)
        if fused in tensors:  # [in, out] on disk
            return lambda: _half(rows(fused), half, 1).transpose(0, 1)
        if fused + "_blocks" in tensors and fused + "_scales" in tensors:

            def decode() -> Any:
                import numpy as np

                from qtool.kernels.fp4 import hf_decode

                b = np.asarray(rows(fused + "_blocks"))
                sc = np.asarray(rows(fused + "_scales"))
                return hf_decode(_half(b, half, 0), _half(sc, half, 0))

            return decode
        return None

    def fused_experts(self, tensors: Mapping[str, Any]) -> list[FusedExperts]:
        """The float expert tensors on disk (``gate_up_proj`` / ``down_proj``, ``[E, in, out]``)
        with the layer runner's per-expert linears each one holds."""
        out = []
        for name, info in tensors.items():
            m = _EXPERTS.match(name)
            if m is None or m["part"] not in (None, ".weight"):
                continue
            e, n_in, n_out = (int(s) for s in info.shape)
            roles = ("down_proj",) if m["proj"] == "down_proj" else ("gate_proj", "up_proj")
            out.append(FusedExperts(name, m["pre"], m["proj"], e, n_out, n_in, roles))
        return out

    def float_tensors(self, tensors: Mapping[str, Any], read: Any) -> list[FloatTensor]:
        """MXFP4 experts decoded into the float layout transformers saves (``[E, in, out]``,
        gate/up still interleaved), one expert at a time into bf16 (every E2M1 value times a
        power of two is exact there); the scales go with their blocks; the rest as stored."""
        out = []
        for name, info in tensors.items():
            m = _EXPERTS.match(name)
            if m is None or m["part"] not in ("_blocks", "_scales"):
                out.append(FloatTensor(name, tuple(info.shape), functools.partial(read, name)))
            elif m["part"] == "_blocks":
                e, rows, nb, _ = (int(x) for x in info.shape)
                fused = f"{m['pre']}.{m['proj']}"
                out.append(FloatTensor(fused, (e, nb * 32, rows), _decoded(fused, read)))
        return out

    # -- config ----------------------------------------------------------------------------------

    def check_moe(self) -> None:
        super().check_moe()
        alpha = float(self.get("swiglu_alpha", default=SWIGLU_ALPHA))
        limit = float(self.get("swiglu_limit", default=SWIGLU_LIMIT))
        if (alpha, limit) != (SWIGLU_ALPHA, SWIGLU_LIMIT):
            raise UnsupportedError(
                f"gpt_oss with swiglu_alpha {alpha} / swiglu_limit {limit}: llama.cpp's gpt-oss "
                f"computes with {SWIGLU_ALPHA} / {SWIGLU_LIMIT}, so its GGUF would compute "
                "another model"
            )
        want = ["sliding" if i % 2 == 0 else "full" for i in range(self.n_layers)]
        if self.layer_types() != want:
            raise UnsupportedError(
                "gpt_oss whose layer_types do not alternate sliding/full from layer 0: "
                "llama.cpp's gpt-oss takes the even layers as sliding-window"
            )
        if not self.get("sliding_window"):
            raise UnsupportedError("gpt_oss without a sliding_window: llama.cpp needs one")
        if self.get("attention_bias") is False:
            raise UnsupportedError(
                "gpt_oss with attention_bias: false: llama.cpp's gpt-oss needs the biases"
            )
        if self.tied:
            raise UnsupportedError(
                "gpt_oss with tie_word_embeddings: true: llama.cpp's gpt-oss needs output.weight"
            )
        qc = self.cfg.get("quantization_config")
        if qc and not self.mxfp4:
            raise UnsupportedError(
                f"gpt_oss quantized with {qc.get('quant_method')!r}: only the float and the "
                "MXFP4 checkpoints are read",
                hint="use the original (MXFP4) or a dequantized (bf16) checkpoint",
            )

    def layer_types(self) -> list[str]:
        if self.cfg.get("layer_types"):
            return super().layer_types()
        # transformers' default: sliding on even layers
        return ["sliding" if i % 2 == 0 else "full" for i in range(self.n_layers)]

    # -- names -----------------------------------------------------------------------------------

    def gguf_name(self, hf_name: str) -> str | None:
        ref = self.expert_of(hf_name)  # one expert's linear, as the layer runner names it
        if ref is not None:
            return ref.gguf
        m = _EXPERTS.match(hf_name)
        if m is not None:
            role = "down" if m["proj"] == "down_proj" else "gate"  # gate_up -> two tensors
            kind = "bias" if m["part"] in ("_bias", ".bias") else "weight"
            return f"blk.{m['layer']}.ffn_{role}_exps.{kind}"
        if hf_name.endswith(".sinks"):
            g = Family.gguf_name(self, hf_name)
            return None if g is None else g + ".weight"
        return Family.gguf_name(self, hf_name)

    def holds_experts(self, hf_name: str) -> bool:
        return _EXPERTS.match(hf_name) is not None

    def stored_params(
        self, hf_name: str, shape: tuple[int, ...]
    ) -> list[tuple[str, tuple[int, ...]]]:
        """MXFP4 blocks ``[E, rows, cols/32, 16]`` hold ``[E, rows, cols]`` parameters (two a
        byte), their scales none; float experts are ``[E, in, out]`` on disk; gate_up (and its
        bias) splits into gate and up."""
        m = _EXPERTS.match(hf_name)
        if m is None:
            return super().stored_params(hf_name, shape)
        if m["part"] == "_scales":
            return []
        bias = m["part"] in ("_bias", ".bias")
        if bias:
            params = shape
        elif m["part"] == "_blocks":
            e, rows, nb, nbytes = shape
            params = (e, rows, nb * nbytes * 2)
        else:
            e, a, b = shape
            params = (e, b, a)
        kind = "bias" if bias else "weight"
        if m["proj"] == "down_proj":
            return [(f"blk.{m['layer']}.ffn_down_exps.{kind}", params)]
        half = (params[0], params[1] // 2, *params[2:])
        return [(f"blk.{m['layer']}.ffn_{role}_exps.{kind}", half) for role in ("gate", "up")]

    def is_router(self, name: str) -> bool:
        return ".mlp.router." in name or name.endswith(".mlp.router") or "ffn_gate_inp" in name

    def is_linear(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.is_router(name) or self.holds_experts(name):
            return False
        return super().is_linear(name, shape)

    # -- GGUF ------------------------------------------------------------------------------------

    def write_gguf_metadata(self, w: Any) -> None:
        super().write_gguf_metadata(w)
        rope = self.rope
        if self.rope_type == "yarn" and rope.get("factor") is not None:
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rope["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            if (v := rope.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(float(v))
            if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(float(v))
            if (v := rope.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(float(v))
            if (v := rope.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(float(v))
        w.add_sliding_window(int(self.get("sliding_window")))
        w.add_expert_feed_forward_length(self.expert_ff)

    def gguf_file_type(self, preset_file_type: int, float_preset: bool) -> int:
        """The converter records a float export of an MXFP4 checkpoint as MOSTLY_MXFP4_MOE."""
        return MXFP4_FILE_TYPE if float_preset and self.mxfp4 else preset_file_type

    def gguf_tensors(self, tensors: Mapping[str, Any]) -> list[GGUFTensor]:
        experts: dict[tuple[str, str], dict[str, Any]] = {}
        rest: dict[str, Any] = {}
        for name, info in tensors.items():
            m = _EXPERTS.match(name)
            if m is None:
                rest[name] = info
            else:
                experts.setdefault((m["layer"], m["proj"]), {})[m["part"] or ""] = (name, info)
        out = []
        for t in Family.gguf_tensors(self, rest):  # routers and biases stay F32, as converted
            f32 = t.float_only or self.is_router(t.name) or not t.name.endswith(".weight")
            out.append(GGUFTensor(t.name, t.shape, t.sources, t.build, f32))
        for (layer, proj), parts in sorted(experts.items()):
            out.extend(self._expert_tensors(int(layer), proj, parts))
        return out

    def _expert_tensors(self, layer: int, proj: str, parts: dict[str, Any]) -> list[GGUFTensor]:
        roles = [("down", None)] if proj == "down_proj" else [("gate", 0), ("up", 1)]
        some = next(iter(parts.values()))[0]
        m = _EXPERTS.match(some)
        assert m is not None
        n_exp = int(next(iter(parts.values()))[1].shape[0])

        def linears(role: str) -> tuple[str, ...]:
            return tuple(f"{m['pre']}.{e}.{role}_proj.weight" for e in range(n_exp))

        out = []
        bias = parts.get("_bias") or parts.get(".bias")
        if bias is not None:
            name, info = bias
            e, n = info.shape
            for role, half in roles:
                rows = n if half is None else n // 2
                out.append(
                    GGUFTensor(
                        f"blk.{layer}.ffn_{role}_exps.bias",
                        (e, rows),
                        (name,),
                        _bias_rows(half),
                        float_only=True,
                    )
                )
        if "_blocks" in parts or "_scales" in parts:
            if "_blocks" not in parts or "_scales" not in parts:
                raise UnsupportedError(
                    f"layer {layer} {proj}: MXFP4 blocks without scales (or scales without blocks)",
                    hint="is the checkpoint complete?",
                )
            (bname, binfo), (sname, _) = parts["_blocks"], parts["_scales"]
            e, rows, nb, _ = binfo.shape
            for role, half in roles:
                r = rows if half is None else rows // 2
                out.append(
                    GGUFTensor(
                        f"blk.{layer}.ffn_{role}_exps.weight",
                        (e, r, nb * 32),
                        (bname, sname),
                        _mxfp4(half, e, encoded=False),
                        encoded_type="MXFP4",
                        encoded=_mxfp4(half, e, encoded=True),
                        experts=linears(role),
                    )
                )
        weight = parts.get("") or parts.get(".weight")
        if weight is not None:
            name, info = weight
            e, a, b = info.shape  # [E, in, out] on disk
            for role, half in roles:
                rows = b if half is None else b // 2
                out.append(
                    GGUFTensor(
                        f"blk.{layer}.ffn_{role}_exps.weight", (e, rows, a), (name,),
                        _float_experts(half, e), experts=linears(role),
                    )
                )  # fmt: skip
        return out


def _decoded(fused: str, read: Any) -> Callable[[], Any]:
    def decode() -> Any:
        import numpy as np
        import torch

        from qtool.kernels.fp4 import hf_decode

        blocks, scales = np.asarray(read(fused + "_blocks")), np.asarray(read(fused + "_scales"))
        e, rows, nb, _ = blocks.shape
        out = torch.empty((e, nb * 32, rows), dtype=torch.bfloat16)
        for i in range(e):
            out[i] = torch.from_numpy(hf_decode(blocks[i], scales[i])).T
        return out

    return decode


def _half(x: Any, half: int | None, axis: int) -> Any:
    """gate (``half`` 0: every even index) or up (1: every odd one) of interleaved gate_up."""
    if half is None:
        return x
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(half, None, 2)
    return x[tuple(idx)]


def _bias_rows(half: int | None) -> Any:
    def build(arrays: Sequence[Any]) -> Iterator[Any]:
        yield _half(arrays[0], half, 1)

    return build


def _one_expert(arrays: Any, i: int, e: int) -> Any:
    """Expert ``e`` of the fused source ``i``, read alone where the sources can (the GGUF
    writer's lazy sources), else sliced from the whole tensor."""
    rows = getattr(arrays, "rows", None)
    return rows(i, e, e + 1)[0] if rows is not None else arrays[i][e]


def _float_experts(half: int | None, n_expert: int) -> Any:
    """One expert at a time: ``[in, out]`` on disk -> ``[out, in]`` rows."""

    def build(arrays: Sequence[Any]) -> Iterator[Any]:
        for e in range(n_expert):
            yield _half(_one_expert(arrays, 0, e), half, 1).swapaxes(0, 1)

    return build


def _mxfp4(half: int | None, n_expert: int, encoded: bool) -> Any:
    """MXFP4 experts one expert at a time: decoded to float32 ``[rows, cols]``, or (``encoded``)
    as ggml ``block_mxfp4`` rows, not decoded."""

    def build(arrays: Sequence[Any]) -> Iterator[Any]:
        from qtool.kernels.fp4 import hf_decode, hf_to_ggml

        convert = hf_to_ggml if encoded else hf_decode
        for e in range(n_expert):
            blocks, scales = _one_expert(arrays, 0, e), _one_expert(arrays, 1, e)
            yield convert(_half(blocks, half, 0), _half(scales, half, 0))

    return build
