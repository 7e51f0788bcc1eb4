"""Resolve SRC (Hub repo id, local folder, or .gguf file) into a lazily read checkpoint.

Nothing here reads tensor data until asked: safetensors headers are parsed directly (8-byte
length + JSON), GGUF headers by :mod:`qtool.gguf_meta`; both give :class:`TensorInfo` entries.
Pickle checkpoints (``.bin``/``.pt``/``.pth``) are refused unless the caller passes
``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.errors import BadInputError, CorruptFileError, SourceNotFoundError, UnsupportedError
from qtool.tensorinfo import TensorInfo

# Files a Hub download needs: config, tokenizer, safetensors weights and their index.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
HUB_META_PATTERNS = ["config.json", "generation_config.json", "model.safetensors.index.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# safetensors dtype name -> bytes per element
ST_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


class _LazyDtypes(dict):  # type: ignore[type-arg]
    """safetensors dtype name -> torch dtype, filled on first use (torch imports slowly)."""

    def get(self, key: str, default: Any = None) -> Any:
        if not self:
            self.update(_torch_dtypes())
        return super().get(key, default)


ST_TORCH_DTYPES = _LazyDtypes()


@dataclass
class Checkpoint:
    """A resolved source: its config, tensor index and files. Tensor data is read on demand."""

    source: str  # what the user passed
    format: str  # "safetensors" | "gguf"
    root: Path  # folder holding config/tokenizer (the .gguf's folder for GGUF)
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path]
    gguf_path: Path | None = None
    gguf_metadata: dict[str, Any] = field(default_factory=dict)
    remote_bytes: int | None = None  # size of weights not downloaded (header-only Hub reads)

    @property
    def hf_layout(self) -> bool:
        """Tensors with Hugging Face names and layout (a safetensors checkpoint, or a GGUF file
        seen through :class:`qtool.models.gguf_view.GGUFView`)."""
        return self.format == "safetensors"

    @property
    def bytes_on_disk(self) -> int:
        """Bytes of the weight files (for a header-only Hub read, their size on the Hub)."""
        if self.remote_bytes is not None:
            return self.remote_bytes
        return sum(f.stat().st_size for f in self.files)

    def read(self, name: str) -> Any:
        """Read one tensor as a torch tensor (safetensors only; GGUF tensors go through the
        codecs, which return float32 numpy arrays).

        The bytes are read with ``pread`` into a buffer of their own, not memory-mapped: a
        mapped shard's pages stay resident once touched, so streaming a model through mmap
        grows the process's memory with every layer read."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        return self.read_rows(name, 0, rows)

    def read_rows(self, name: str, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of a tensor (its first dimension), read with ``pread``."""
        info = self.tensors[name]
        if self.format != "safetensors":
            raise UnsupportedError(f"reading raw tensors from {self.format} is done by the codecs")
        import torch

        dtype = ST_TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise UnsupportedError(f"tensor {name}: dtype {info.dtype} is not supported")
        shape = info.shape if info.shape else (1,)
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        nbytes = (stop - start) * row_bytes
        out_shape = (stop - start, *shape[1:]) if info.shape else ()
        if nbytes == 0:
            return torch.empty(out_shape, dtype=dtype)
        buf = bytearray(nbytes)
        with open(info.file, "rb", buffering=0) as f:
            view = memoryview(buf)
            done = 0
            while done < nbytes:
                n = os.preadv(f.fileno(), [view[done:]], info.offset + start * row_bytes + done)
                if n == 0:
                    raise CorruptFileError(f"{info.file}: truncated while reading {name}")
                done += n
        return torch.frombuffer(buf, dtype=dtype).reshape(out_shape)


# --------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------


def open_checkpoint(
    src: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    headers_only: bool = False,
) -> Checkpoint:
    """Resolve ``src`` and index its tensors (headers only).

    ``headers_only`` asks the Hub for config and safetensors headers alone (used by ``inspect``);
    otherwise a Hub id is downloaded (config, tokenizer, safetensors) into the HF cache.
    """
    path = Path(src).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return _open_gguf(src, path)
            if path.suffix == ".safetensors":
                return _open_folder(src, path.parent, allow_pickle=allow_pickle, only=path)
            raise BadInputError(
                f"{src}: not a checkpoint (expected a folder, a .gguf file or a Hub repo id)"
            )
        return _open_folder(src, path, allow_pickle=allow_pickle)
    if src.endswith(".gguf") or src.startswith((".", "/", "~")) or not _REPO_ID.match(src):
        raise SourceNotFoundError(
            f"{src}: no such file or folder",
            hint="pass a local checkpoint folder, a .gguf file, or a Hub repo id like org/name",
        )
    return _open_hub(src, revision=revision, allow_pickle=allow_pickle, headers_only=headers_only)


def _open_hub(
    repo_id: str, *, revision: str | None, allow_pickle: bool, headers_only: bool
) -> Checkpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = HUB_META_PATTERNS if headers_only else HUB_PATTERNS
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError as e:
        raise SourceNotFoundError(
            f"{repo_id}: the repository is gated",
            hint="accept its licence on the Hub and set HF_TOKEN",
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceNotFoundError(
            f"{repo_id}: no such repository on the Hub (or it is private)",
            hint="check the id, or set HF_TOKEN for a private repo",
        ) from e
    except RevisionNotFoundError as e:
        raise SourceNotFoundError(f"{repo_id}: revision {revision!r} not found") from e
    except LocalEntryNotFoundError as e:
        raise SourceNotFoundError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub is unreachable",
            hint="connect to the network, unset HF_HUB_OFFLINE, or pass a local folder",
        ) from e
    if headers_only and not _has_local_weights(folder):
        return _open_hub_headers(repo_id, revision, folder, allow_pickle=allow_pickle)
    return _open_folder(repo_id, folder, allow_pickle=allow_pickle)


def _has_local_weights(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return all((folder / s).exists() for s in shards)
    return any(folder.glob("*.safetensors"))


def _open_hub_headers(
    repo_id: str, revision: str | None, folder: Path, *, allow_pickle: bool
) -> Checkpoint:
    """Index a Hub model from its safetensors headers alone (HTTP range requests)."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError

    config = _read_config(folder)
    try:
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError as e:
        raise _pickle_error(repo_id, allow_pickle) from e
    tensors: dict[str, TensorInfo] = {}
    for fname, fmeta in meta.files_metadata.items():
        for name, t in fmeta.tensors.items():
            tensors[name] = TensorInfo(
                name,
                tuple(t.shape),
                t.dtype,
                t.data_offsets[1] - t.data_offsets[0],
                folder / fname,
            )
    remote = sum(t.nbytes for t in tensors.values())  # tensor data; headers are small
    return Checkpoint(
        repo_id, "safetensors", folder, config, tensors, files=[], remote_bytes=remote
    )


def _pickle_error(src: str, allow_pickle: bool) -> BadInputError:
    return UnsupportedError(
        f"{src}: only pickle weights (.bin/.pt) found; qtool reads safetensors and GGUF",
        hint=(
            "pickle can run arbitrary code: convert to safetensors first, or pass "
            "--allow-pickle if you trust the source"
            if not allow_pickle
            else "pickle loading is not supported by this command yet"
        ),
    )


def _read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.exists():
        raise BadInputError(
            f"{folder}: no config.json",
            hint="point at a Hugging Face checkpoint folder (config.json + *.safetensors)",
        )
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{cfg}: not valid JSON ({e.msg} at line {e.lineno})") from e


def _open_folder(
    src: str, folder: Path, *, allow_pickle: bool, only: Path | None = None
) -> Checkpoint:
    if not folder.is_dir():
        raise SourceNotFoundError(f"{src}: not a folder")
    config = _read_config(folder)
    index = folder / "model.safetensors.index.json"
    if only is not None:
        shards = [only]
    elif index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CorruptFileError(f"{index}: not a valid safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CorruptFileError(
                f"{index}: names shard {missing[0]} which is missing from {folder}",
                hint="re-download the checkpoint",
            )
        shards = [folder / n for n in names]
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
            raise _pickle_error(src, allow_pickle)
        raise BadInputError(
            f"{src}: no weights found (no *.safetensors files)",
            hint="point at a checkpoint folder with safetensors weights, or a .gguf file",
        )
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        tensors.update(read_safetensors_header(shard))
    if index.exists() and only is None:
        listed = set(weight_map)
        absent = listed - set(tensors)
        if absent:
            name = sorted(absent)[0]
            raise CorruptFileError(
                f"{index}: tensor {name} is listed for {weight_map[name]} but not stored there",
                hint="re-download the checkpoint",
            )
    return Checkpoint(src, "safetensors", folder, config, tensors, files=shards)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that it covers the file exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise CorruptFileError(
                f"{path}: corrupt or truncated safetensors header ({n} bytes claimed, "
                f"file has {size})",
                hint="re-download the file",
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path}: corrupt safetensors header ({e})") from e
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    end = 0
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = t["data_offsets"]
            shape = tuple(t["shape"])
            dtype = t["dtype"]
            valid = (
                isinstance(dtype, str)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(start) is int
                and type(stop) is int
                and 0 <= start <= stop
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CorruptFileError(f"{path}: corrupt header entry for {name}")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in ST_DTYPE_BYTES and stop - start != numel * ST_DTYPE_BYTES[dtype]:
            raise CorruptFileError(f"{path}: tensor {name} has {stop - start} bytes for {shape}")
        end = max(end, stop)
        out[name] = TensorInfo(name, shape, dtype, stop - start, path, base + start)
    if base + end > size:
        raise CorruptFileError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {base + end})",
            hint="re-download the file",
        )
    return out


def _open_gguf(src: str, path: Path) -> Checkpoint:
    from qtool.gguf_meta import read_gguf

    metadata, tensors = read_gguf(path)
    config = config_from_gguf(metadata, tensors)
    return Checkpoint(
        src,
        "gguf",
        path.parent,
        config,
        tensors,
        files=[path],
        gguf_path=path,
        gguf_metadata=metadata,
    )


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """An HF-style config dict built from GGUF metadata, for reports and model building."""
    arch = str(meta.get("general.architecture", "unknown"))

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else None
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    head_dim = get("attention.key_length") or (hidden // n_heads if hidden and n_heads else None)
    return {
        "model_type": {"gemma3": "gemma3_text", "gpt-oss": "gpt_oss"}.get(arch, arch),
        "gguf_architecture": arch,
        "num_hidden_layers": get("block_count"),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "sliding_window": get("attention.sliding_window"),
        "name": meta.get("general.name"),
    }


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("", "0", "false", "no")
