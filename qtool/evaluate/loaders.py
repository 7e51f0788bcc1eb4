"""Artifact -> something that turns a window of tokens into logits.

An artifact is an HF checkpoint (plain, or quantized with a ``quantization_config`` that
transformers can load on this machine), or a GGUF file. A GGUF file is decoded exactly with
qtool's codecs into the *base* model's architecture (:mod:`qtool.evaluate.gguf_decode`), so its
numbers describe the weights llama.cpp runs; ``backend="llama.cpp"`` runs the file through
llama-cpp-python instead.

Every model is wrapped in a runner whose ``run(ids)`` returns a :class:`Logits` that yields its
rows slice by slice: the torch runner keeps only the last hidden states and applies the output
head per slice, so no (ctx x vocab) float64 array is ever built.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qtool.checkpoint import Checkpoint, open_checkpoint
from qtool.errors import (
    BadInputError,
    CorruptFileError,
    UnsupportedError,
)
from qtool.evaluate.gguf_decode import decode_state_dict
from qtool.events import SILENT, Reporter, quiet_transformers

BACKENDS = ("torch", "llama.cpp")
DTYPES = ("float32", "bfloat16", "float16")


class Logits(Protocol):
    n: int

    def rows(self, start: int, stop: int) -> Any:
        """float32 logits of positions [start, stop), shape (stop - start, vocab)."""
        ...


class Runner(Protocol):
    vocab: int

    def run(self, ids: np.ndarray) -> Logits: ...


@dataclass
class EvalModel:
    """One model taking part in the evaluation: what it is and how to run it."""

    label: str  # the source as the user gave it
    ckpt: Checkpoint
    kind: str  # "hf", "gguf", "compressed-tensors", "gptq"
    backend: str  # "torch" | "llama.cpp"
    runner: Runner
    config: dict[str, Any]  # HF config dict of the architecture it runs as
    max_context: int | None

    @property
    def weight_bytes(self) -> int:
        """Bytes of tensor data (GGUF blocks, safetensors tensors): what bits/weight counts."""
        return sum(t.nbytes for t in self.ckpt.tensors.values())

    @property
    def vocab(self) -> int:
        return self.runner.vocab


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------


class _HeadLogits:
    """Hidden states of one window; the output head is applied per slice of rows."""

    def __init__(self, hidden: Any, head: Any, softcap: float | None) -> None:
        self.hidden = hidden
        self.head = head
        self.softcap = softcap
        self.n = int(hidden.shape[0])

    def rows(self, start: int, stop: int) -> Any:
        import torch

        with torch.inference_mode():
            z = self.head(self.hidden[start:stop]).float()
            if self.softcap:  # Gemma3ForCausalLM.forward: tanh(z / cap) * cap
                z = torch.tanh(z / self.softcap) * self.softcap
        return z


class _FullLogits:
    def __init__(self, logits: Any) -> None:
        self.logits = logits
        self.n = int(logits.shape[0])

    def rows(self, start: int, stop: int) -> Any:
        return self.logits[start:stop].float()


class TorchRunner:
    """A transformers causal LM evaluated window by window (no KV cache kept between)."""

    def __init__(self, model: Any, device: str) -> None:
        self.model = model.eval()
        self.device = device
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        cfg = cfg or model.config
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        # an output head that is exactly ``lm_head(h)`` (+ a final soft-cap) runs per slice of
        # rows (the family says so); other architectures fall back to the full forward
        from qtool.models import family_for

        self.sliced = family_for(model.config.to_dict(), strict=False).sliceable_head
        self.softcap = getattr(cfg, "final_logit_softcapping", None)

    def run(self, ids: np.ndarray) -> Logits:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]
            if self.sliced:
                h = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state[0]
                return _HeadLogits(h, self.model.get_output_embeddings(), self.softcap)
            return _FullLogits(self.model(input_ids=x, use_cache=False).logits[0])


class _ArrayLogits:
    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores
        self.n = int(scores.shape[0])

    def rows(self, start: int, stop: int) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.scores[start:stop], dtype=np.float32))


class LlamaCppRunner:
    """A GGUF file evaluated by llama.cpp (llama-cpp-python), every position's logits kept."""

    def __init__(self, path: Path, ctx: int, threads: int | None = None) -> None:
        if importlib.util.find_spec("llama_cpp") is None:  # a dev dependency only
            raise UnsupportedError(
                "--backend llama.cpp needs llama-cpp-python",
                hint="pip install llama-cpp-python, or use the default --backend torch",
            )
        from qtool.evaluate.llamacpp import open_llama

        try:
            self.llm = open_llama(path, ctx, threads)
        except (ValueError, RuntimeError) as e:
            raise CorruptFileError(
                f"{path}: llama.cpp could not load the file ({e})",
                hint="check that the file is a complete GGUF of an architecture llama.cpp knows",
            ) from e
        self.vocab = int(self.llm.n_vocab())

    def run(self, ids: np.ndarray) -> Logits:
        self.llm.reset()  # n_tokens = 0: eval() then clears the whole KV cache
        self.llm.eval([int(t) for t in ids])
        return _ArrayLogits(self.llm.scores[: len(ids)])


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise BadInputError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda is an input error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: no CUDA device here", hint="use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise BadInputError(f"--device {name}: choose cpu, cuda, cuda:N or auto")
    return name


def open_source(src: str) -> Checkpoint:
    """open_checkpoint for eval (a Hub id's weights are downloaded, pickle is refused); a
    local GGUF file goes through the fast header reader (:mod:`.gguf_header`)."""
    path = Path(src).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from qtool.evaluate.gguf_header import open_gguf

        return open_gguf(src, path)
    return open_checkpoint(src)


def hf_config(ckpt: Checkpoint) -> Any:
    """transformers' config of a checkpoint (for a GGUF: transformers' GGUF reader)."""
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            if ckpt.format == "gguf":
                assert ckpt.gguf_path is not None
                return AutoConfig.from_pretrained(
                    str(ckpt.gguf_path.parent), gguf_file=ckpt.gguf_path.name
                )
            return AutoConfig.from_pretrained(str(ckpt.root))
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedError(f"{ckpt.source}: transformers cannot read its config ({e})") from e


def load_tokenizer(ckpt: Checkpoint) -> Any:
    """The tokenizer of a checkpoint folder, or of a GGUF through transformers' GGUF loader."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            if ckpt.format == "gguf":
                assert ckpt.gguf_path is not None
                return AutoTokenizer.from_pretrained(
                    str(ckpt.gguf_path.parent), gguf_file=ckpt.gguf_path.name
                )
            return AutoTokenizer.from_pretrained(str(ckpt.root))
    except Exception as e:  # transformers raises OSError/ValueError/TypeError variously
        raise BadInputError(
            f"{ckpt.source}: no usable tokenizer ({type(e).__name__}: {str(e)[:200]})",
            hint="the --base must hold its tokenizer (tokenizer.json or tokenizer.model)",
        ) from e


def _quant_method(ckpt: Checkpoint) -> str | None:
    q = ckpt.config.get("quantization_config") or (ckpt.config.get("text_config") or {}).get(
        "quantization_config"
    )
    if not q:
        return None
    return str(q.get("quant_method", "unknown")).lower()


def _from_pretrained(ckpt: Checkpoint, dtype: Any, device: str, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(ckpt.root), dtype=dtype, trust_remote_code=False, **kwargs
            )
    except ValueError as e:
        raise UnsupportedError(f"{ckpt.source}: transformers cannot load it ({e})") from e
    return model.to(device)  # type: ignore[arg-type]  # transformers' stub types .to oddly


def load_hf_model(ckpt: Checkpoint, dtype: Any, device: str) -> tuple[Any, str]:
    """A safetensors checkpoint through transformers, dispatching on ``quantization_config``.
    Returns (model, kind)."""
    method = _quant_method(ckpt)
    if method is None:
        return _from_pretrained(ckpt, dtype, device), "hf"
    if method == "compressed-tensors":
        if importlib.util.find_spec("compressed_tensors") is None:
            raise UnsupportedError(
                f"{ckpt.source}: a compressed-tensors checkpoint needs the compressed-tensors "
                "package",
                hint="pip install compressed-tensors",
            )
        from transformers import CompressedTensorsConfig

        # dequantize=True: the packed weights are decoded once at load into dense Linear
        # weights (transformers' CompressedTensorsHfQuantizer), which runs on CPU.
        model = _from_pretrained(
            ckpt, dtype, device, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        return model, "compressed-tensors"
    if method == "mxfp4":
        from transformers.utils.quantization_config import Mxfp4Config

        # dequantize=True: the experts are decoded once at load (transformers'
        # convert_moe_packed_tensors), which runs on CPU; its MXFP4 kernels need triton
        model = _from_pretrained(
            ckpt, dtype, device, quantization_config=Mxfp4Config(dequantize=True)
        )
        return model, "mxfp4"
    if method == "gptq":
        if importlib.util.find_spec("gptqmodel") is None:
            # transformers loads GPTQ through gptqmodel, whose wheels bring a CUDA build of
            # torch: without it, qtool unpacks the v1 layout into a dense model itself.
            return load_gptq_unpacked(ckpt, dtype, device), "gptq"
        return _from_pretrained(ckpt, dtype, device), "gptq"
    raise UnsupportedError(
        f"{ckpt.source}: quantization_config quant_method {method!r} is not supported by "
        "qtool eval",
        hint="supported: unquantized, compressed-tensors, gptq, mxfp4 and GGUF files",
    )


def load_gptq_unpacked(ckpt: Checkpoint, dtype: Any, device: str) -> Any:
    """A GPTQ v1 checkpoint unpacked by qtool (:func:`qtool.formats.gptq.
    dense_tensors`) into a dense model built from its config without ``quantization_config``:
    the weights are exactly ``scales * (q - (qzeros + 1))``, as the GPTQ kernels compute."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtool.formats.gptq import dense_tensors

    cfg_dict = copy.deepcopy(ckpt.config)
    cfg_dict.pop("quantization_config", None)
    model_type = cfg_dict.get("model_type")
    try:
        with quiet_transformers():
            cfg = AutoConfig.for_model(**cfg_dict)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedError(
            f"{ckpt.source}: transformers cannot build a {model_type!r} model ({e})"
        ) from e
    cls = type(skeleton)
    del skeleton
    names = list(ckpt.tensors)
    state = dict(dense_tensors(names, ckpt.read, ckpt.config, dtype))
    with quiet_transformers():
        model = cls.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype)
    del state
    return model.to(device)


def load_gguf_into(
    ckpt: Checkpoint, base_config: Any, dtype: Any, device: str
) -> tuple[Any, dict[str, Any]]:
    """Decode a GGUF file exactly into ``base_config``'s architecture. Returns (model,
    config dict). The output head is tied when the file has no ``output.weight``, as llama.cpp
    then multiplies with ``token_embd``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(base_config)
    tied = "output.weight" not in ckpt.tensors
    cfg.tie_word_embeddings = tied
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = tied
    with quiet_transformers(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    cls = type(skeleton)  # the Auto class's from_pretrained wants a path; the model class not
    del skeleton
    state = decode_state_dict(ckpt, expected, cfg.to_dict(), dtype=dtype, tied=tied)
    with quiet_transformers():
        model = cls.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype)
    del state
    return model.to(device), cfg.to_dict()


def check_same_architecture(
    art: Checkpoint, base_cfg: dict[str, Any], reporter: Reporter = SILENT
) -> None:
    """A GGUF decodes into the base's architecture only if its shape numbers are the base's."""
    from qtool.models.spec import ModelSpec

    a = ModelSpec.from_config(art.config)
    b = ModelSpec.from_config(base_cfg)
    pairs = {
        "layers": (a.n_layers, b.n_layers),
        "hidden size": (a.hidden, b.hidden),
        "intermediate size": (a.intermediate, b.intermediate),
        "attention heads": (a.n_heads, b.n_heads),
        "kv heads": (a.n_kv_heads, b.n_kv_heads),
        "head dim": (a.head_dim, b.head_dim),
    }
    for what, (x, y) in pairs.items():
        if x is not None and y is not None and int(x) != int(y):
            raise BadInputError(
                f"{art.source}: {what} {x} differs from the base model's {y}: it is not a "
                "quantization of --base",
                hint="pass the --base this GGUF was made from",
            )
    meta = art.gguf_metadata
    arch = str(meta.get("general.architecture"))
    bcfg = {**base_cfg, **(base_cfg.get("text_config") or {})}
    eps = meta.get(f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is not None and bcfg.get("rms_norm_eps") is not None:
        if abs(float(eps) - float(bcfg["rms_norm_eps"])) > 1e-3 * float(bcfg["rms_norm_eps"]):
            reporter.warn(
                f"{art.source}: RMS-norm epsilon {eps} differs from the base's "
                f"{bcfg['rms_norm_eps']}; the decoded run uses the base's"
            )


def load_model(
    ckpt: Checkpoint,
    *,
    role: str,
    dtype: Any,
    device: str,
    backend: str,
    ctx: int,
    base_hf_config: Any = None,
    threads: int | None = None,
    reporter: Reporter = SILENT,
) -> EvalModel:
    """Build the runner of an opened checkpoint. ``role`` is "base" or "artifact". A GGUF file
    runs through llama.cpp when ``backend`` is "llama.cpp", else it is decoded into
    ``base_hf_config``'s architecture; safetensors checkpoints always run through torch."""
    src = ckpt.source
    if backend == "llama.cpp" and ckpt.format == "gguf":
        max_ctx = ckpt.config.get("max_position_embeddings")
        check_context(src, ctx, max_ctx)
        runner: Runner = LlamaCppRunner(ckpt.gguf_path or Path(src), ctx, threads)
        return EvalModel(src, ckpt, "gguf", "llama.cpp", runner, dict(ckpt.config), max_ctx)
    if ckpt.format == "gguf":
        cfg_obj = base_hf_config if base_hf_config is not None else hf_config(ckpt)
        if role == "artifact":
            check_same_architecture(ckpt, cfg_obj.to_dict(), reporter)
        max_ctx = ckpt.config.get("max_position_embeddings")
        check_context(src, ctx, max_ctx)
        model, cfg = load_gguf_into(ckpt, cfg_obj, dtype, device)
        return EvalModel(src, ckpt, "gguf", "torch", TorchRunner(model, device), cfg, max_ctx)
    tcfg = {**ckpt.config, **(ckpt.config.get("text_config") or {})}
    max_ctx = tcfg.get("max_position_embeddings")
    check_context(src, ctx, max_ctx)
    model, kind = load_hf_model(ckpt, dtype, device)
    return EvalModel(
        src, ckpt, kind, "torch", TorchRunner(model, device), model.config.to_dict(), max_ctx
    )


def check_context(src: str, ctx: int, max_ctx: Any) -> None:
    """Refuse a window longer than the model's trained context."""
    if max_ctx and ctx > int(max_ctx):
        raise BadInputError(
            f"--ctx {ctx} is beyond {src}'s context length {int(max_ctx)}",
            hint=f"use --ctx {int(max_ctx)} or less",
        )


def same_source(a: Checkpoint, b: Checkpoint) -> bool:
    """Two sources that are the very same files (then one model serves both)."""
    fa = sorted(str(p.resolve()) for p in a.files)
    fb = sorted(str(p.resolve()) for p in b.files)
    return bool(fa) and fa == fb
