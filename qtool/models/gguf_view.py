"""A GGUF file read as a Hugging Face checkpoint: HF names, HF layout, float32 values.

Calibration, GPTQ and the safetensors formats work on HF tensors; a GGUF source becomes one
through its model family: names mapped with the family's HF <-> llama.cpp table over the
architecture's own parameter names (a meta-device model of the config, no weights), values
decoded exactly by the codecs (what llama.cpp multiplies with) and put back in HF layout by
:meth:`qtool.models.Family.from_gguf`. The HF config and tokenizer come from transformers' own
GGUF support (``AutoConfig`` / ``AutoTokenizer`` with ``gguf_file=``) and are written once into a
cache folder keyed by the file, which serves as the view's ``root`` (what the layer runner and
the calibration tokenizer read).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from qtool.checkpoint import Checkpoint
from qtool.errors import CorruptFileError, UnsupportedError
from qtool.models.base import Family
from qtool.tensorinfo import TensorInfo

# GGUF tensors llama.cpp computes with that have no HF weight: HF derives them from the config.
RUNTIME_ONLY = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


VIEW_VERSION = 1  # bump when the config / tokenizer conversion changes: old caches are ignored
VIEW_FILE = "qtool_view.json"  # what qtool added to transformers' conversion


def cache_root() -> Path:
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool")) / "gguf-hf"


def _key(path: Path) -> str:
    from qtool import __version__

    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{__version__}|{VIEW_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


# Tokenizer-config keys transformers records about where it loaded from (the temporary link).
_TOKENIZER_CONFIG_NOISE = ("is_local", "local_files_only", "name_or_path", "gguf_file")
# llama.cpp pre-tokenizers (tokenizer.ggml.pre) that transformers' GGUF tokenizer conversion
# does not know: it then keeps GPT-2's split, which differs. ``smollm`` is llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit split off ("\p{N}"), then GPT-2's regex; it is what
# SmolLM2's own tokenizer.json does with Digits(individual_digits=True) + ByteLevel.
_PRE_TOKENIZER_FIXES = ("smollm",)


def hf_folder(ckpt: Checkpoint, family: Family | None = None) -> Path:
    """config.json, generation_config.json and the tokenizer of a GGUF source, made by
    transformers' GGUF loaders, completed by the model family where transformers leaves out
    something llama.cpp uses (:meth:`Family.complete_hf_config`), cached per file.

    transformers only sees a private folder holding a link to the GGUF file, with
    ``local_files_only`` and no remote code: stray ``config.json`` / ``tokenizer_config.json``
    files beside the GGUF (an ``auto_map`` among them) are never read."""
    from qtool.io import atomic_dir
    from qtool.models.base import family_for

    assert ckpt.gguf_path is not None
    folder = cache_root() / _key(ckpt.gguf_path)
    if (folder / "config.json").is_file():
        return folder
    family = family or family_for(ckpt.config)
    family.check_gguf_source(ckpt)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _gguf_link(ckpt.gguf_path) as (link_dir, name), atomic_dir(folder, first_wins=True) as tmp:
        local = {"gguf_file": name, "local_files_only": True, "trust_remote_code": False}
        added = _write_config(ckpt, family, link_dir, local, tmp)
        tokenizer = _write_tokenizer(ckpt, link_dir, local, tmp)
        (tmp / VIEW_FILE).write_text(
            json.dumps({"config_added": added, "tokenizer": tokenizer}, indent=1, sort_keys=True)
        )
    return folder


def view_notes(folder: Path) -> dict[str, Any]:
    """What :func:`hf_folder` added to transformers' conversion (config keys, tokenizer)."""
    f = folder / VIEW_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


@contextmanager
def _gguf_link(path: Path) -> Iterator[tuple[str, str]]:
    """A private folder holding only a link to the GGUF file."""
    with tempfile.TemporaryDirectory(prefix="qtool-gguf-") as d:
        name = "model.gguf"
        try:
            os.symlink(path.resolve(), Path(d) / name)
        except OSError:  # a filesystem without links: read the real folder
            yield str(path.resolve().parent), path.name
            return
        yield d, name


def _write_config(
    ckpt: Checkpoint, family: Family, folder: str, local: dict[str, Any], tmp: Path
) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from qtool.events import quiet_transformers

    try:
        with quiet_transformers():
            cfg = AutoConfig.from_pretrained(folder, **local)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UnsupportedError(
            f"{ckpt.source}: transformers cannot read its config ({type(e).__name__}: "
            f"{str(e)[:200]})",
        ) from e
    added = family.complete_hf_config(cfg, ckpt)
    try:
        with quiet_transformers(), torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedError(
            f"{ckpt.source}: transformers cannot build a {cfg.model_type!r} model from its "
            f"config ({e})"
        ) from e
    cfg.architectures = [type(skeleton).__name__]
    with quiet_transformers():
        cfg.save_pretrained(tmp)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
    return added


def _write_tokenizer(
    ckpt: Checkpoint, folder: str, local: dict[str, Any], tmp: Path
) -> dict[str, Any]:
    """transformers' GGUF tokenizer, with llama.cpp's behaviour where transformers lacks it."""
    from transformers import AutoTokenizer

    from qtool.events import quiet_transformers

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder, **local)
    except Exception as e:  # transformers raises ValueError/KeyError/TypeError variously
        raise UnsupportedError(
            f"{ckpt.source}: transformers cannot build its tokenizer ({type(e).__name__}: "
            f"{str(e)[:200]})",
        ) from e
    meta = ckpt.gguf_metadata
    pre = meta.get("tokenizer.ggml.pre")
    adjusted = []
    if pre in _PRE_TOKENIZER_FIXES and meta.get("tokenizer.ggml.model") == "gpt2":
        from tokenizers import pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        adjusted.append(f"pre-tokenizer {pre}")
    if meta.get("tokenizer.ggml.model") == "llama":
        whole = _respelled_user_tokens(tok, meta)
        if whole:
            tok.add_tokens(whole)
            adjusted.append(f"{len(whole)} user-defined whitespace tokens matched whole")
    with quiet_transformers():
        tok.save_pretrained(str(tmp))
    tc = tmp / "tokenizer_config.json"
    if tc.is_file():
        data = json.loads(tc.read_text(encoding="utf-8"))
        for k in _TOKENIZER_CONFIG_NOISE:
            data.pop(k, None)
        tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {
        "class": type(tok).__name__,
        "model": meta.get("tokenizer.ggml.model"),
        "pre": pre,
        "tokens": len(tok),
        "adjusted": adjusted,
    }


def _respelled_user_tokens(tok: Any, meta: dict[str, Any]) -> list[Any]:
    """SentencePiece vocabularies' user-defined tokens that transformers respelled and so did
    not add whole (Gemma's runs of 2..31 spaces, stored as spaces, looked up as "▁▁").

    llama.cpp (like SentencePiece) matches user-defined tokens in the text before merging,
    longest first, so 58 spaces are 31 + 27; transformers' rebuilt merges give 16 + 16 + 26.
    Added as normalized tokens (they match the "▁" the normalizer writes), they match whole
    again, longest first."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    out = []
    for t, kind in zip(tokens, types, strict=False):
        spelled = t.replace(" ", "\u2581")
        if kind == 4 and t not in vocab and spelled != t and spelled in vocab:  # USER_DEFINED
            out.append(AddedToken(spelled, normalized=True, special=False))
    return out


def meta_shapes(config: dict[str, Any], folder: Path) -> dict[str, tuple[int, ...]]:
    """{HF parameter name: shape} of the architecture, from a meta-device model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtool.events import quiet_transformers

    with quiet_transformers():
        cfg = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def hf_names_for(ckpt: Checkpoint, family: Family) -> dict[str, str]:
    """{GGUF name: HF name} for every GGUF tensor of ``ckpt`` that has an HF counterpart."""
    folder = hf_folder(ckpt, family)
    shapes = meta_shapes(ckpt.config, folder)
    inverse = family.hf_names(list(shapes))
    return {g: inverse[g] for g in ckpt.tensors if g in inverse}


class GGUFView(Checkpoint):
    """A GGUF checkpoint seen with HF names; tensors decoded on read."""

    family: Family
    gguf: Checkpoint
    hf_to_gguf: dict[str, str]

    @classmethod
    def open(cls, ckpt: Checkpoint, family: Family) -> GGUFView:
        folder = hf_folder(ckpt, family)
        config = json.loads((folder / "config.json").read_text())
        shapes = meta_shapes(config, folder)
        inverse = family.hf_names(list(shapes))
        tensors: dict[str, TensorInfo] = {}
        mapping: dict[str, str] = {}
        for g, info in ckpt.tensors.items():
            if g in RUNTIME_ONLY:
                continue
            hf = inverse.get(g)
            if hf is None:
                raise UnsupportedError(
                    f"{ckpt.source}: GGUF tensor {g} has no counterpart in the "
                    f"{family.model_type} architecture"
                )
            shape = shapes[hf]
            if tuple(info.shape) != tuple(shape):
                raise CorruptFileError(
                    f"{ckpt.source}: GGUF tensor {g} has shape {tuple(info.shape)}, its metadata "
                    f"makes {hf} {shape}",
                    hint="the file's metadata and tensors disagree: re-export it",
                )
            n = int(np.prod(shape))
            tensors[hf] = TensorInfo(hf, shape, "F32", 4 * n, info.file, info.offset)
            mapping[hf] = g
        tied = bool(config.get("tie_word_embeddings"))
        missing = sorted(set(shapes) - set(tensors) - ({"lm_head.weight"} if tied else set()))
        if missing:
            raise CorruptFileError(
                f"{ckpt.source}: the GGUF file has no tensor for {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                hint="the file is incomplete: re-download or re-export it",
            )
        view = cls(ckpt.source, "gguf", folder, config, tensors, files=list(ckpt.files))
        view.gguf_path = ckpt.gguf_path
        view.gguf_metadata = ckpt.gguf_metadata
        view.family = family_for_view(config, folder, family)
        view.gguf = ckpt
        view.hf_to_gguf = mapping
        return view

    @property
    def hf_layout(self) -> bool:
        return True

    def read(self, name: str) -> Any:
        import torch

        from qtool.gguf_meta import read_gguf_tensor

        g = self.hf_to_gguf[name]
        w = self.family.from_gguf(name, read_gguf_tensor(self.gguf, g))
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    def read_rows(self, name: str, start: int, stop: int) -> Any:
        return self.read(name)[start:stop]

    @property
    def bytes_on_disk(self) -> int:
        return self.gguf.bytes_on_disk


def family_for_view(config: dict[str, Any], folder: Path, family: Family) -> Family:
    return type(family)(config, folder)
