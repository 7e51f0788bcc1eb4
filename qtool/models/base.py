"""The model-family base class: every architecture fact qtool uses, in one place per family.

A family is a subclass of :class:`Family` in its own module (``qtool/models/llama.py`` ...),
registered by the Hugging Face ``model_type`` values it serves (``hf_types``). The base class
does what most decoder-only transformers share (llama.cpp's converter calls that ``TextModel``);
a family overrides only what differs, as the classes of llama.cpp's ``convert_hf_to_gguf.py``
do:

- **names**: HF tensor name <-> llama.cpp name, through gguf-py's ``TensorNameMap`` (the table
  llama.cpp's converter uses), both ways;
- **GGUF conversion**: the metadata keys (:meth:`write_gguf_metadata`), and the GGUF tensors of a
  checkpoint (:meth:`gguf_tensors`): one HF tensor to one GGUF tensor with a value transform
  (:meth:`to_gguf`, e.g. Llama's Q/K row permutation, Gemma's ``w + 1`` norms), tensors that
  are *generated* from the config (0 -> 1, Llama 3's ``rope_freqs``) and tensors *merged* from
  several HF tensors (N -> 1, MoE experts stacked into 3-D ``ffn_*_exps``); and the inverse
  (:meth:`from_gguf`) so that a GGUF file reads as an HF checkpoint;
- **quantization**: which tensors are decoder linears (:meth:`is_linear`: what RTN, GPTQ and
  BitNet quantize), the norm -> linear pairs SmoothQuant and AWQ fold into
  (:attr:`smooth_pairs`), whether norms compute ``x * (1 + w)`` (:attr:`norm_offset`);
- **runtime**: per-layer attention kinds for the KV-cache report (:meth:`layer_types`), the
  attention implementation the layer runner builds layers with, the final logit soft-cap.

Nothing here imports torch: tensors are transformed with operations numpy and torch share
(``reshape``, ``swapaxes``, slicing), so ``qtool inspect`` stays light.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, ClassVar

from qtool.errors import UnsupportedError

# Tensors llama.cpp never loads: rotary caches some checkpoints store.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, planned from the checkpoint's headers.

    ``sources``: the HF tensors it is made of (one for an ordinary tensor, none for a generated
    one, several for a merged one). ``shape``: PyTorch order (rows first), after the family's
    transform. ``build``: for generated and merged tensors, a function of the source tensors'
    float32 arrays (in ``sources`` order, each read when indexed) returning the tensor in row
    chunks.
    ``float_only``: the tensor keeps a float type whatever the preset (llama.cpp keeps 1-D
    tensors and generated factors in F32)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    build: Callable[[Any], Iterator[Any]] | None = field(default=None, compare=False)
    float_only: bool = False
    # Sources already encoded in a GGUF block type (gpt-oss's MXFP4 experts): ``encoded`` builds
    # the tensor's bytes in that type from the sources as stored (row chunks of uint8), which a
    # float export or a preset choosing that very type writes as they are; ``build`` decodes them
    # to float for any other type.
    encoded_type: str | None = None
    encoded: Callable[[Any], Iterator[Any]] | None = field(default=None, compare=False)
    # A merged tensor of experts stored fused on disk (gpt-oss): each expert's weight by the
    # name the layer runner gives its linear (``...experts.3.gate_proj.weight``), in expert
    # order; GPTQ quantizes those and their rows are stacked. Empty: the sources are the experts.
    experts: tuple[str, ...] = ()

    @property
    def hf_name(self) -> str | None:
        """The single HF tensor this is a (transformed) copy of, else None."""
        return self.sources[0] if len(self.sources) == 1 and self.build is None else None


@dataclass(frozen=True)
class FloatTensor:
    """One tensor of a dense export: its name and shape there, and how to read it."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], Any]


class Family:
    """Base class: a llama-like decoder. Subclasses set ``hf_types`` and ``gguf_arch``."""

    hf_types: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[str] = ""  # gguf-py MODEL_ARCH member, lower case ("llama")
    registry: ClassVar[dict[str, type[Family]]] = {}
    # (norm module, linears reading its output) inside one decoder layer
    smooth_pairs: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    norm_offset: ClassVar[bool] = False  # RMSNorm computes x / rms * (1 + w)
    attn_implementation: ClassVar[str] = "sdpa"  # what the layer runner builds layers with
    # output head is exactly lm_head(h) (+ soft-cap): eval applies it per slice of rows
    sliceable_head: ClassVar[bool] = True
    # Whether a GGUF file of the family can be a source: qtool reads GGUF files as HF
    # checkpoints (names, config, tokenizer) through transformers' GGUF readers, which must
    # know the architecture.
    gguf_readable: ClassVar[bool] = True
    # GGUF tensors llama.cpp computes with that have no HF weight, which the family turns back
    # into HF config when reading a GGUF (:meth:`gguf_config_extras`); others are refused.
    gguf_runtime_tensors: ClassVar[tuple[str, ...]] = ()
    # The safetensors formats quantize writes for the family (GGUF files are always written);
    # None: every one but ``mxfp4`` (which holds fused MoE experts: gpt-oss).
    safetensors_outputs: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for mt in cls.hf_types:
            Family.registry[mt] = cls

    def __init__(self, config: Mapping[str, Any], folder: Path | None = None) -> None:
        # Multimodal wrappers keep the language model's numbers in text_config.
        self.config = dict(config)
        self.cfg = {**config, **(config.get("text_config") or {})}
        self.folder = folder

    # -- config access -------------------------------------------------------------------------

    def get(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        return default

    @property
    def model_type(self) -> str:
        return str(self.cfg.get("model_type", "unknown"))

    @property
    def n_layers(self) -> int:
        return int(self.get("num_hidden_layers", "n_layer", "num_layers", default=0))

    @property
    def n_head(self) -> int:
        return int(self.get("num_attention_heads", "n_head", default=1))

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=0) or self.get("hidden_size") // self.n_head)

    @property
    def tied(self) -> bool:
        return bool(self.cfg.get("tie_word_embeddings", False))

    @property
    def rope(self) -> dict[str, Any]:
        """RoPE parameters: transformers >= 5 ``rope_parameters`` (per attention kind for
        Gemma 3) or the older ``rope_scaling`` + ``rope_theta``."""
        rp = self.cfg.get("rope_parameters") or self.cfg.get("rope_scaling") or {}
        rp = rp.get("full_attention", rp)
        theta = rp.get("rope_theta", self.cfg.get("rope_theta"))
        return {**rp, "rope_theta": theta}

    @property
    def rope_type(self) -> str | None:
        rope = self.rope
        t = rope.get("rope_type") or rope.get("type")
        return None if t in (None, "default") else str(t)

    # -- names ---------------------------------------------------------------------------------

    def gguf_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for an HF tensor name, or None when it has none."""
        if hf_name.startswith(("token_embd.", "output", "blk.", "rope_")):
            return hf_name  # already a GGUF name
        name = re.sub(r"^model\.language_model\.", "model.", hf_name)
        return _name_map(self.gguf_arch or "llama", self.n_layers).get_name(
            name, try_suffixes=(".weight", ".bias")
        )

    def hf_names(self, hf_names: Iterator[str] | list[str]) -> dict[str, str]:
        """{GGUF name: HF name} for the given HF names (the inverse of :meth:`gguf_name`)."""
        inverse: dict[str, str] = {}
        for hf in hf_names:
            g = self.gguf_name(hf)
            if g is not None:
                inverse.setdefault(g, hf)
        return inverse

    @staticmethod
    def layer_index(hf_name: str) -> int | None:
        m = _LAYER.search(hf_name)
        return int(m.group(2)) if m else None

    # -- what is quantized ---------------------------------------------------------------------

    def is_linear(self, name: str, shape: tuple[int, ...]) -> bool:
        """A decoder layer's linear weight, by HF name (``model.layers.N.self_attn.q_proj.
        weight``) or llama.cpp name (``blk.N.attn_q.weight``): what RTN, GPTQ and BitNet
        quantize; embeddings, norms, MoE routers and the output head are not."""
        if len(shape) != 2 or not name.endswith(".weight") or name.endswith("norm.weight"):
            return False
        if name.startswith("blk."):
            return ("attn_" in name or "ffn_" in name) and "ffn_gate_inp" not in name
        return _LAYER.search(name) is not None and ".mlp.gate.weight" not in name

    def expert_of(self, hf_name: str) -> Any:
        """For a mixture-of-experts family, the routed expert a per-expert tensor or linear
        belongs to (:class:`qtool.models.moe.ExpertRef`); None for dense families."""
        return None

    def holds_experts(self, hf_name: str) -> bool:
        """Whether a stored tensor holds routed experts' parameters (the MoE report)."""
        return self.expert_of(hf_name) is not None

    def float_tensors(self, tensors: Mapping[str, Any], read: Any) -> list[FloatTensor]:
        """The checkpoint as float tensors, in order, for a dense safetensors export: every
        tensor as stored; families whose checkpoints hold encoded weights (gpt-oss's MXFP4
        experts) decode them into the layout transformers saves."""
        return [FloatTensor(n, tuple(t.shape), partial(read, n)) for n, t in tensors.items()]

    def stored_params(
        self, hf_name: str, shape: tuple[int, ...]
    ) -> list[tuple[str, tuple[int, ...]]]:
        """The parameters a stored tensor holds, as (llama.cpp name, shape rows first as
        ``nn.Linear`` stores them) per GGUF tensor they go to (what ``inspect`` counts and
        sizes); none for a tensor holding no parameters (quantization scales). Packed, fused
        or transposed layouts (gpt-oss's MXFP4 experts) override this."""
        return [(self.gguf_name(hf_name) or hf_name, shape)]

    def gguf_file_type(self, preset_file_type: int, float_preset: bool) -> int:
        """``general.file_type`` of a GGUF export (the preset's ``llama_ftype``); a family whose
        checkpoints carry quantized tensors into float exports may record another."""
        return preset_file_type

    def virtual_reader(
        self, name: str, tensors: Mapping[str, Any], read: Any, read_rows: Any
    ) -> Callable[[], Any] | None:
        """How the layer runner reads a parameter the checkpoint holds inside another tensor
        (gpt-oss: one expert's projection of a fused, possibly MXFP4, tensor), given the
        checkpoint's tensor names and its ``read(name)`` / ``read_rows(name, start, stop)``;
        None (the default) when ``name`` is not one."""
        return None

    def skip(self, hf_name: str) -> bool:
        """Tensors llama.cpp does not load (rotary caches, a duplicated tied lm_head)."""
        if hf_name.endswith(_SKIP_SUFFIXES):
            return True
        return self.tied and hf_name == "lm_head.weight"

    # -- runtime facts -------------------------------------------------------------------------

    def layer_types(self) -> list[str]:
        """``"full"`` or ``"sliding"`` per layer (the KV-cache report)."""
        if self.cfg.get("layer_types"):
            return ["sliding" if "sliding" in str(t) else "full" for t in self.cfg["layer_types"]]
        return ["full"] * self.n_layers

    @property
    def logit_softcap(self) -> float | None:
        v = self.cfg.get("final_logit_softcapping")
        return float(v) if v else None

    # -- GGUF ----------------------------------------------------------------------------------

    def check_gguf(self) -> None:
        """Raise :class:`UnsupportedError` if the config has a feature GGUF export cannot
        reproduce faithfully (called before any work)."""
        if self.rope_type not in (None, "linear", *self.extra_rope_types):
            raise UnsupportedError(
                f"RoPE scaling {self.rope_type!r} is not supported for GGUF export of "
                f"{self.model_type}",
                hint="supported: none (default), linear"
                + "".join(f", {t}" for t in self.extra_rope_types),
            )

    extra_rope_types: ClassVar[tuple[str, ...]] = ()

    def write_gguf_metadata(self, w: Any) -> None:
        """The hyper-parameter keys llama.cpp reads (``TextModel.set_gguf_parameters``)."""
        self.check_gguf()
        w.add_block_count(self.n_layers)
        if (ctx := self.get("max_position_embeddings")) is not None:
            w.add_context_length(int(ctx))
        w.add_embedding_length(int(self.get("hidden_size")))
        w.add_feed_forward_length(int(self.get("intermediate_size")))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        rope = self.rope
        if self.rope_type == "linear" and rope.get("factor"):
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(float(rope["rope_theta"]))
        if (eps := self.get("rms_norm_eps")) is not None:
            w.add_layer_norm_rms_eps(float(eps))
        if (head_dim := self.cfg.get("head_dim")) is not None:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))

    def gguf_tensors(self, tensors: Mapping[str, Any]) -> list[GGUFTensor]:
        """The GGUF tensors of a checkpoint whose tensor index (name -> info with ``.shape``)
        is ``tensors``: every HF tensor llama.cpp loads, renamed and transformed, plus the
        generated ones. Raises :class:`UnsupportedError` for a tensor with no llama.cpp name."""
        out = []
        for name, info in tensors.items():
            if self.skip(name):
                continue
            g = self.gguf_name(name)
            if g is None:
                raise UnsupportedError(
                    f"tensor {name} has no llama.cpp name for {self.model_type}",
                    hint="this checkpoint has tensors the llama.cpp architecture does not use",
                )
            shape = self.shape_to_gguf(name, tuple(info.shape))
            out.append(GGUFTensor(g, shape, (name,), float_only=len(shape) == 1))
        return out + self.generated_tensors()

    def generated_tensors(self) -> list[GGUFTensor]:
        """Tensors computed from the config (0 -> 1); none by default."""
        return []

    def to_gguf(self, hf_name: str, t: Any) -> Any:
        """HF tensor (float; numpy or torch) -> the layout llama.cpp expects."""
        return t

    def from_gguf(self, hf_name: str, t: Any) -> Any:
        """Inverse of :meth:`to_gguf` (a GGUF tensor read back in HF layout)."""
        return t

    def shape_to_gguf(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape :meth:`to_gguf` gives, known before any data is read (for the plan)."""
        return shape

    def rows_independent(self, hf_name: str) -> bool:
        """Whether :meth:`to_gguf` keeps each row as it is (at most dropping trailing rows),
        so the tensor can stream in row chunks."""
        return True

    # -- a GGUF file read back as HF ------------------------------------------------------------

    def complete_hf_config(self, cfg: Any, gguf: Any) -> dict[str, Any]:
        """Add to transformers' config of a GGUF file (``cfg``, changed in place; ``gguf`` the
        opened file) what llama.cpp's model uses and transformers' GGUF reader leaves out.
        Returns {key: value} of the changes."""
        meta, tensors = gguf.gguf_metadata, gguf.tensors
        added: dict[str, Any] = {}

        def put(name: str, value: Any) -> None:
            if getattr(cfg, name, None) != value:
                setattr(cfg, name, value)
                added[name] = value

        # transformers records general.name as "_model_name_or_path"; it names no path here.
        cfg.__dict__.pop("_model_name_or_path", None)
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        put("tie_word_embeddings", "output.weight" not in tensors)
        if "token_embd.weight" in tensors:  # the rows are the vocabulary the model computes over
            put("vocab_size", int(tensors["token_embd.weight"].shape[0]))
        rope = dict(cfg.rope_parameters or {})
        rope = self.gguf_config_extras(
            cfg, gguf, rope, lambda k, d=None: meta.get(f"{self.gguf_arch}.{k}", d), put
        )
        if rope != (cfg.rope_parameters or {}):
            cfg.rope_parameters = rope
            added["rope_parameters"] = rope
        return added

    def gguf_config_extras(
        self, cfg: Any, gguf: Any, rope: dict[str, Any], key: Any, put: Any
    ) -> dict[str, Any]:
        """The family's part of :meth:`complete_hf_config`: returns the RoPE parameters.
        Base: llama.cpp's default RoPE base, linear scaling."""
        if key("rope.freq_base") is None:  # llama.cpp's default base
            rope["rope_theta"] = 10000.0
        if key("rope.scaling.type") == "linear" and key("rope.scaling.factor"):
            rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
        return rope

    def check_gguf_source(self, gguf: Any) -> None:
        """Refuse a GGUF file whose HF conversion would not compute what llama.cpp does."""
        if not self.gguf_readable:
            raise UnsupportedError(
                f"{gguf.source}: transformers has no GGUF reader for {self.gguf_arch!r}, "
                "through which qtool reads GGUF sources",
                hint="use the original Hugging Face checkpoint (llama-quantize can requantize "
                "the file)",
            )
        meta = gguf.gguf_metadata
        scaling = meta.get(f"{self.gguf_arch}.rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise UnsupportedError(
                f"{gguf.source}: RoPE scaling {scaling!r} is not supported for a GGUF source yet",
                hint="supported: none and linear; use the original Hugging Face checkpoint",
            )
        if "rope_freqs.weight" in gguf.tensors and "rope_freqs.weight" not in (
            self.gguf_runtime_tensors
        ):
            raise UnsupportedError(
                f"{gguf.source}: the file carries RoPE frequency factors (rope_freqs), which "
                f"qtool rebuilds for llama only, not {self.gguf_arch}",
                hint="use the original Hugging Face checkpoint of this model",
            )
        if any(
            n.startswith("rope_factors_") and n not in self.gguf_runtime_tensors
            for n in gguf.tensors
        ):
            raise UnsupportedError(
                f"{gguf.source}: the file carries long-context RoPE factors (rope_factors_*), "
                f"which qtool rebuilds for phi3 only, not {self.gguf_arch}",
                hint="use the original Hugging Face checkpoint of this model",
            )

    def changes_values(self, hf_name: str) -> bool:
        """Whether :meth:`to_gguf` changes values (Gemma's ``w + 1`` norms) rather than only
        reordering or dropping rows (Llama's Q/K permutation, Gemma's padded embedding)."""
        return False

    def rows_to_gguf(self, hf_name: str, rows: Any) -> Any:
        """Apply :meth:`to_gguf` to quantized row data (block bytes, one row per output
        channel): only transforms that reorder or drop rows apply to encoded rows."""
        if self.changes_values(hf_name):
            raise UnsupportedError(f"{hf_name}: its GGUF transform changes values, not rows")
        return self.to_gguf(hf_name, rows)


@lru_cache(maxsize=32)
def _name_map(gguf_arch: str, n_layers: int) -> Any:
    import gguf

    # the MODEL_ARCH member of an arch name ("gpt-oss" -> GPT_OSS)
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper().replace("-", "_")], n_layers)


class GenericFamily(Family):
    """An architecture qtool has no family for: enough for ``inspect`` (llama's tensor names
    are the best guess); refused by everything that converts or runs it."""

    sliceable_head = False
    # its norms and who reads them are unknown: nothing to smooth, no norm the runner may skip
    smooth_pairs: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()


def family_for(
    config: Mapping[str, Any], folder: Path | None = None, *, strict: bool = True
) -> Family:
    """The family serving ``config``'s ``model_type``. ``strict``: an unknown architecture is an
    :class:`UnsupportedError` naming the supported ones; otherwise a :class:`GenericFamily`."""
    cfg = {**config, **(config.get("text_config") or {})}
    model_type = str(cfg.get("model_type", "unknown"))
    cls = Family.registry.get(model_type)
    if cls is None:
        if not strict:
            return GenericFamily(config, folder)
        raise UnsupportedError(
            f"architecture {model_type!r} is not supported",
            hint=f"supported: {', '.join(supported())}; `qtool inspect` still works on it, "
            "and README 'Adding a model family' says how to add one",
        )
    return cls(config, folder)


def supported() -> list[str]:
    return sorted(Family.registry)
