"""Calibration data: resolve ``--dataset`` into documents, tokenize them, pick samples.

A ``--dataset`` value is one of (checked in this order):

1. a **named set** defined in ``calibration_sets/NAME.yaml`` (``wikitext2``, ``c4``, ``pile-val``
   on the Hub with a pinned revision; ``canterbury`` from the offline assets);
2. a **local** ``.txt``/``.jsonl``/``.json``/``.parquet``/``.csv`` file, or a folder of them
   (read in sorted path order; a ``.txt`` file is one document);
3. a **Hub spec** ``org/name[:config]:split[:field]``.

Everything is read through the ``datasets`` library, so a local file and the same text on the
Hub give the same documents. Samples are then made the same way for every source:

- the documents (empty ones skipped) are tokenized one by one without special tokens and
  concatenated, ``join`` (default ``"\\n\\n"``) tokenized between them, until ``max_tokens``.
  A document longer than :data:`PIECE_CHARS` characters is tokenized in pieces cut after a
  line end (a fast tokenizer holds about 500 bytes per token of one call: a 7 MB text file
  would cost a gigabyte at once); a token that would have spanned a cut is split there;
- the stream is cut into ``len // seq_len`` aligned windows; window ``i`` gets the rank
  ``sha256(f"{seed}:{i}")`` and the ``samples`` lowest-ranked windows are taken, in rank order.
  Pure hashing, no RNG library: the same text, tokenizer and seed give the same token ids on
  every machine and every numpy/torch version; different seeds pick different windows;
- when the tokenizer adds a BOS token, the first token of each sample is replaced by BOS, as
  ``llama-imatrix`` does for each chunk (tools/imatrix/imatrix.cpp, ``compute_imatrix``).

The token ids are recorded by their SHA-256 (int32 little-endian) in the stats file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from qtool.errors import BadInputError

PIECE_CHARS = 1 << 18  # a longer document is tokenized in pieces of about this many characters

# Local file suffix -> the ``datasets`` packaged builder that reads it.
BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
DEFAULT_JOIN = "\n\n"
DEFAULT_MAX_TOKENS = 1 << 22  # 4,194,304 tokens of stream: plenty of windows, tokenized in seconds
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT = re.compile(r"^(train|validation|valid|val|test|dev|eval)(\w*)(\[[^\]]*\])?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class HubDatasetUnreachableError(BadInputError):
    """A Hub dataset is neither reachable nor in the local ``datasets`` cache."""


def offline_hint() -> str:
    """What to do without the Hub: the named sets that read offline assets, or local files."""
    try:
        offline = [n for n, d in list_calibration_sets().items() if "assets" in d]
    except BadInputError:
        offline = []
    sets = " or ".join(f"--dataset {n}" for n in offline)
    return (
        "connect to the network (and unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), or calibrate "
        f"offline: {sets + ' (after `make assets`), ' if sets else ''}a local "
        ".txt/.jsonl/.parquet/.csv file or folder"
    )


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved ``--dataset``: where the documents come from and how they are joined."""

    spec: str  # what the user typed
    kind: str  # "named" | "local" | "hub"
    name: str | None = None  # the named set, if any
    description: str | None = None
    # Hub sources
    path: str | None = None  # repo id
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: tuple[str, ...] = ()
    # local sources (a named offline set resolves to files too)
    files: tuple[Path, ...] = ()
    text_field: str | None = None  # None: "text", or the only string column
    join: str = DEFAULT_JOIN
    max_tokens: int = DEFAULT_MAX_TOKENS

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description recorded in the stats file."""
        d: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        if self.name:
            d["name"] = self.name
        if self.kind == "hub":
            d.update(
                path=self.path,
                config=self.config,
                split=self.split,
                revision=self.revision,
                data_files=list(self.data_files) or None,
            )
        else:
            d["files"] = [p.name if self.name else str(p) for p in self.files]
        d.update(text_field=self.text_field, join=self.join, max_tokens=self.max_tokens)
        return d


def calibration_sets_dir() -> Path:
    """The folder of named calibration-set definitions.

    ``$QTOOL_CALIBRATION_SETS`` wins; else ``calibration_sets/`` at the repository root (an
    editable install), else the copy packaged as ``qtool/calibration_sets`` (package data).
    """
    env = os.environ.get("QTOOL_CALIBRATION_SETS")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "calibration_sets", here.parents[1] / "calibration_sets"):
        if cand.is_dir():
            return cand
    return here.parents[2] / "calibration_sets"


def list_calibration_sets() -> dict[str, dict[str, Any]]:
    """Named sets: name -> the definition (parsed YAML)."""
    folder = calibration_sets_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: _read_definition(p) for p in sorted(folder.glob("*.yaml"))}


def _read_definition(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BadInputError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict) or not ({"hub", "assets"} & set(data)):
        raise BadInputError(f"{path}: a calibration set needs a `hub:` or an `assets:` section")
    return data


def assets_root() -> Path:
    """Where ``make assets`` puts the offline assets (``$QTOOL_ASSETS`` overrides)."""
    return Path(os.environ.get("QTOOL_ASSETS", Path.home() / ".cache" / "qtool" / "assets"))


def resolve_dataset(
    spec: str, *, text_field: str | None = None, revision: str | None = None
) -> DatasetSpec:
    """Turn a ``--dataset`` value into a :class:`DatasetSpec` (no data is read yet).

    ``text_field`` overrides the column; ``revision`` pins a Hub spec, or replaces a named Hub
    set's pinned revision.
    """
    if not spec or not spec.strip():
        raise BadInputError(
            "--dataset is empty", hint="give a set name, a local file or org/name:split"
        )
    sets_dir = calibration_sets_dir()
    named = sets_dir / f"{spec}.yaml"
    if "/" not in spec and ":" not in spec and named.is_file():
        return _named(spec, _read_definition(named), text_field, revision)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(spec, path, text_field)
    if spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in BUILDERS:
        raise BadInputError(f"--dataset {spec}: no such file or folder")
    repo = spec.split(":", 1)[0]
    if _REPO_ID.match(repo):
        return _hub(spec, text_field, revision)
    names = ", ".join(list_calibration_sets()) or "none found"
    raise BadInputError(
        f"--dataset {spec}: not a named set, a local file or folder, or a Hub spec",
        hint=f"named sets: {names}; Hub: org/name[:config]:split[:field]",
    )


def _named(
    name: str, d: dict[str, Any], text_field: str | None, revision: str | None = None
) -> DatasetSpec:
    description = d.get("description")
    join = str(d.get("join", DEFAULT_JOIN))
    max_tokens = int(d.get("max_tokens", DEFAULT_MAX_TOKENS))
    if "assets" in d:
        a = d["assets"]
        folder = assets_root() / str(a.get("folder", ""))
        files = tuple(folder / str(f) for f in a.get("files") or [])
        missing = [p for p in files if not p.is_file()]
        if not files or not folder.is_dir() or missing:
            raise BadInputError(
                f"--dataset {name}: the offline asset "
                f"{missing[0] if missing else folder} is missing",
                hint="run `make assets` (or scripts/assets.py) to prepare the offline assets",
            )
        return DatasetSpec(
            spec=name,
            kind="local",
            name=name,
            description=description,
            files=files,
            text_field=text_field,
            join=join,
            max_tokens=max_tokens,
        )
    h = d["hub"]
    if not isinstance(h, dict) or not h.get("path"):
        raise BadInputError(f"calibration set {name}: its `hub:` section needs a `path`")
    data_files = h.get("data_files") or ()
    if isinstance(data_files, str):
        data_files = (data_files,)
    return DatasetSpec(
        spec=name,
        kind="hub",
        name=name,
        description=description,
        path=str(h["path"]),
        config=h.get("config"),
        split=str(h.get("split", "train")),
        revision=revision or h.get("revision"),
        data_files=tuple(data_files),
        text_field=text_field or h.get("field"),
        join=join,
        max_tokens=max_tokens,
    )


def _local(spec: str, path: Path, text_field: str | None) -> DatasetSpec:
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.suffix.lower() in BUILDERS))
        if not files:
            raise BadInputError(
                f"--dataset {spec}: the folder has no .txt/.jsonl/.json/.parquet/.csv files"
            )
    else:
        if path.suffix.lower() not in BUILDERS:
            raise BadInputError(
                f"--dataset {spec}: unsupported file type {path.suffix or '(none)'}",
                hint="use a .txt, .jsonl, .json, .parquet or .csv file",
            )
        files = (path,)
    return DatasetSpec(spec=spec, kind="local", files=files, text_field=text_field)


def _hub(spec: str, text_field: str | None, revision: str | None) -> DatasetSpec:
    repo, *rest = spec.split(":")
    config: str | None = None
    fld: str | None = None
    if not rest:
        rest = [""]
    if len(rest) == 1:
        split = rest[0]
    elif len(rest) == 2:
        if _SPLIT.match(rest[1]) and not _SPLIT.match(rest[0]):
            config, split = rest
        elif _SPLIT.match(rest[0]):
            split, fld = rest
        else:
            raise BadInputError(
                f"--dataset {spec}: cannot tell which part is the split",
                hint=f"spell all four parts: {repo}:CONFIG:SPLIT:FIELD",
            )
    elif len(rest) == 3:
        config, split, fld = rest
    else:
        raise BadInputError(
            f"--dataset {spec}: too many ':' parts", hint="use org/name[:config]:split[:field]"
        )
    if not split:
        raise BadInputError(
            f"--dataset {spec}: a Hub dataset needs a split",
            hint=f"e.g. {repo}:train or {repo}:CONFIG:train:text",
        )
    return DatasetSpec(
        spec=spec,
        kind="hub",
        path=repo,
        config=config or None,
        split=split,
        revision=revision,
        text_field=text_field or fld or None,
    )


# --------------------------------------------------------------------------------------------
# documents
# --------------------------------------------------------------------------------------------


@dataclass
class Documents:
    """The documents of a dataset, in order, with what they were read from."""

    spec: DatasetSpec
    texts: Sequence[str]
    text_field: str
    resolved_revision: str | None = None  # the commit a Hub revision resolved to
    notes: list[str] = field(default_factory=list)


def load_documents(spec: DatasetSpec) -> Documents:
    """Read the documents of ``spec`` through ``datasets``."""
    ds, revision, notes = _load_local(spec) if spec.kind == "local" else _load_hub(spec)
    fld = _text_column(spec, ds)
    return Documents(spec, ds[fld], fld, resolved_revision=revision, notes=notes)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars from ``datasets`` on stderr: qtool draws its own."""
    import datasets

    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.logging.enable_progress_bar()


def _load_local(spec: DatasetSpec) -> tuple[Any, None, list[str]]:
    import datasets

    groups: dict[str, list[str]] = {}
    for f in spec.files:
        groups.setdefault(BUILDERS[f.suffix.lower()], []).append(str(f))
    if len(groups) > 1:
        kinds = ", ".join(sorted(groups))
        raise BadInputError(
            f"--dataset {spec.spec}: mixes file types ({kinds})",
            hint="put one kind of file in the folder",
        )
    ((builder, files),) = groups.items()
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for unreadable files
        raise BadInputError(
            f"--dataset {spec.spec}: could not read it as {builder} ({type(e).__name__}: {e})"
        ) from e
    return ds, None, []


def _hub_reachable() -> bool:
    """A cheap probe of the Hub endpoint (2 s), so an offline run fails in seconds rather than
    after ``datasets``' retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0"):
        return False
    url = urlparse(constants.ENDPOINT)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # let datasets go through the proxy
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), 2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Make ``datasets`` and ``huggingface_hub`` use their caches only, for this call."""
    import datasets.config as dcfg
    from huggingface_hub import constants

    saved = (dcfg.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    dcfg.HF_HUB_OFFLINE = True
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(spec: DatasetSpec) -> tuple[Any, str | None, list[str]]:
    import datasets

    notes: list[str] = []
    online = _hub_reachable()
    revision = spec.revision
    if online:
        revision = _resolve_revision(spec) or revision
    if revision and not _SHA.match(str(revision)):
        notes.append(
            f"{spec.path}: revision {revision!r} is not a commit: the data may change upstream"
        )
    where = f"Hub dataset {spec.path}" + (f" (set {spec.name})" if spec.name else "")
    try:
        with _quiet_datasets(), contextlib.nullcontext() if online else _offline_mode():
            ds = datasets.load_dataset(
                spec.path,
                spec.config,
                split=spec.split,
                revision=revision,
                data_files=list(spec.data_files) or None,
            )
    except (ConnectionError, TimeoutError) as e:
        raise HubDatasetUnreachableError(
            f"{where} is unreachable and not in the local datasets cache", hint=offline_hint()
        ) from e
    except Exception as e:  # noqa: BLE001 - map datasets' many error kinds to one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not online:
            raise HubDatasetUnreachableError(
                f"{where} is unreachable and could not be loaded from the cache ({msg})",
                hint=offline_hint(),
            ) from e
        raise BadInputError(
            f"--dataset {spec.spec}: could not load {where} ({type(e).__name__}: {msg})",
            hint="check the name, config and split on the Hub",
        ) from e
    if isinstance(ds, dict):  # a DatasetDict: split was not applied
        raise BadInputError(f"--dataset {spec.spec}: give a split (one of {', '.join(ds)})")
    return ds, revision, notes


def _resolve_revision(spec: DatasetSpec) -> str | None:
    """The commit the spec's revision points at (None when it cannot be asked)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().dataset_info(spec.path or "", revision=spec.revision, timeout=10)
    except RevisionNotFoundError as e:
        raise BadInputError(f"{spec.path}: revision {spec.revision!r} not found on the Hub") from e
    except RepositoryNotFoundError as e:
        raise BadInputError(
            f"--dataset {spec.spec}: no dataset {spec.path} on the Hub (or it is private)",
            hint="check the id, or set HF_TOKEN for a private dataset",
        ) from e
    except Exception:  # noqa: BLE001 - a network hiccup: datasets will say more
        return None
    return getattr(info, "sha", None)


def _text_column(spec: DatasetSpec, ds: Any) -> str:
    features = getattr(ds, "features", None) or {}
    columns = list(getattr(ds, "column_names", None) or features)
    strings = [
        c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")
    ]
    if spec.text_field:
        if spec.text_field not in columns:
            raise BadInputError(
                f"--dataset {spec.spec}: no text field {spec.text_field!r} "
                f"(columns: {', '.join(columns) or 'none'})",
                hint="pass --text-field with one of the string columns"
                + (f": {', '.join(strings)}" if strings else ""),
            )
        if spec.text_field not in strings:
            raise BadInputError(
                f"--dataset {spec.spec}: field {spec.text_field!r} is not text "
                f"({features.get(spec.text_field)})",
                hint=f"string columns: {', '.join(strings) or 'none'}",
            )
        return spec.text_field
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise BadInputError(
        f"--dataset {spec.spec}: no 'text' field (columns: {', '.join(columns) or 'none'})",
        hint="pass --text-field NAME"
        + (f" with one of the string columns: {', '.join(strings)}" if strings else ""),
    )


# --------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """``samples`` windows of ``seq_len`` token ids, and how they were picked."""

    ids: Any  # torch.LongTensor [samples, seq_len]
    windows: list[int]  # the picked window indices, in order
    n_windows: int  # windows available
    stream_tokens: int  # tokens in the stream the windows were cut from
    documents: int  # documents read
    text_sha256: str  # hash of the documents read
    tokens_sha256: str  # hash of ``ids`` (int32 little-endian)
    bos_token_id: int | None  # set as the first token of each sample, or None
    seed: int

    def as_dict(self) -> dict[str, Any]:
        n, seq_len = (int(d) for d in self.ids.shape)
        return {
            "samples": n,
            "seq_len": seq_len,
            "seed": self.seed,
            "windows": self.windows,
            "windows_available": self.n_windows,
            "stream_tokens": self.stream_tokens,
            "documents": self.documents,
            "text_sha256": self.text_sha256,
            "tokens_sha256": self.tokens_sha256,
            "bos_token_id": self.bos_token_id,
        }


def window_rank(seed: int, index: int) -> bytes:
    """The sort key of window ``index`` for ``seed``: SHA-256, portable and version-proof."""
    return hashlib.sha256(f"qtool-calibration:{seed}:{index}".encode()).digest()


def tokens_sha256(ids: Any) -> str:
    """SHA-256 of token ids as int32 little-endian bytes (the recorded sample hash)."""
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids), dtype="<i4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _adds_bos(tokenizer: Any) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "a" adds nothing useful
        return None
    return int(bos) if ids and ids[0] == bos else None


def make_samples(
    docs: Documents, tokenizer: Any, *, samples: int, seq_len: int, seed: int
) -> Samples:
    """Tokenize ``docs`` into one stream and pick ``samples`` windows of ``seq_len`` tokens."""
    import torch

    if samples < 1 or seq_len < 2:
        raise BadInputError(f"need --samples >= 1 and --seq-len >= 2 (got {samples}, {seq_len})")
    spec = docs.spec
    sep = list(tokenizer(spec.join, add_special_tokens=False)["input_ids"]) if spec.join else []
    stream = array("q")  # 8 bytes a token, not a Python int object each
    text_hash = hashlib.sha256()
    n_docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_docs
        if not batch:
            return
        pieces, owner = [], []
        for k, doc in enumerate(batch):
            cut = _pieces(doc)
            pieces += cut
            owner += [k] * len(cut)
        last, i = -1, 0
        while i < len(pieces):  # one tokenizer call per ~PIECE_CHARS characters
            j, size = i + 1, len(pieces[i])
            while j < len(pieces) and size + len(pieces[j]) <= PIECE_CHARS:
                size += len(pieces[j])
                j += 1
            encoded = tokenizer(pieces[i:j], add_special_tokens=False)["input_ids"]
            for k, ids in zip(owner[i:j], encoded, strict=True):
                if k != last:  # a new document
                    if stream and sep:
                        stream.extend(sep)
                    n_docs += 1
                    last = k
                stream.extend(ids)
            i = j
        batch.clear()

    for text in docs.texts:
        if text is None or not str(text).strip():
            continue
        data = str(text).encode("utf-8")
        text_hash.update(len(data).to_bytes(8, "little"))
        text_hash.update(data)
        batch.append(str(text))
        if len(batch) >= 64:
            flush()
            if len(stream) >= spec.max_tokens:
                break
    flush()
    if n_docs == 0:
        raise BadInputError(
            f"--dataset {spec.spec}: no text (every {docs.text_field!r} value is empty)",
            hint="check the file or the --text-field",
        )
    del stream[spec.max_tokens :]
    n_windows = len(stream) // seq_len
    if n_windows < samples:
        raise BadInputError(
            f"--dataset {spec.spec}: {len(stream):,} tokens make {n_windows} windows of "
            f"{seq_len}, fewer than the {samples} samples asked",
            hint="lower --samples or --seq-len, or use a larger dataset",
        )
    picked = sorted(range(n_windows), key=lambda i: window_rank(seed, i))[:samples]
    flat = torch.frombuffer(stream, dtype=torch.int64)
    ids = torch.stack([flat[i * seq_len : (i + 1) * seq_len] for i in picked])
    bos = _adds_bos(tokenizer)
    if bos is not None:
        ids[:, 0] = bos
    return Samples(
        ids=ids,
        windows=picked,
        n_windows=n_windows,
        stream_tokens=len(stream),
        documents=n_docs,
        text_sha256=text_hash.hexdigest(),
        tokens_sha256=tokens_sha256(ids),
        bos_token_id=bos,
        seed=seed,
    )


_LINE_START = re.compile(r"\n(?=\S)")


def _pieces(doc: str) -> list[str]:
    """``doc`` cut into pieces of at most :data:`PIECE_CHARS` characters, each cut after a line
    end that a non-space character follows (the regex pre-tokenizers of byte-level BPE split
    there anyway, so the tokens are those of the whole text); a text without one is cut where
    the piece is full. Joined, the pieces are ``doc``."""
    if len(doc) <= PIECE_CHARS:
        return [doc]
    out = []
    start = 0
    while len(doc) - start > PIECE_CHARS:
        ends = [m.end() for m in _LINE_START.finditer(doc, start + 1, start + PIECE_CHARS)]
        cut = ends[-1] if ends else start + PIECE_CHARS
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a checkpoint folder or a Hub id (never remote code)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise BadInputError(
            f"{path}: no usable tokenizer "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            hint="pass --tokenizer with a folder holding tokenizer.json or tokenizer.model",
        ) from e


__all__ = [
    "DatasetSpec",
    "Documents",
    "HubDatasetUnreachableError",
    "Samples",
    "calibration_sets_dir",
    "list_calibration_sets",
    "load_documents",
    "load_tokenizer",
    "make_samples",
    "resolve_dataset",
    "tokens_sha256",
]
