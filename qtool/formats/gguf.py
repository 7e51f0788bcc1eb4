"""The GGUF format: plan every tensor's type, then stream read-convert-encode-write.

The plan comes from the model family (:meth:`qtool.models.Family.gguf_tensors`: HF tensors
renamed and transformed, generated tensors such as Llama 3's ``rope_freqs``, merged ones such
as MoE experts) or, for a GGUF source, from the file's own tensors; each tensor's type is
llama-quantize's choice (:mod:`qtool.policy`). Tensor data then comes one tensor at a time,
either already encoded by a method (GPTQ's codes on the tensor's GGUF grid, BitNet's trits:
rows in HF order, reordered by the family as llama.cpp's converter reorders them) or as float
rows encoded here by the codecs, which is round-to-nearest exactly as ``llama-quantize`` does it.

Memory holds one tensor at a time (its source rows, their float32 copy and their encoded bytes),
so it grows with the largest tensor, not with the depth.

The file is written as ``OUT.qtool-partial/data.part`` beside the target and renamed over it
when complete. That folder is also the export's checkpoint: every ``CHECKPOINT_BYTES`` of tensor
data (or ``CHECKPOINT_SECONDS``) the data is synced and ``state.json`` records how many tensors
are complete, the byte offset after them and the run's identity (the source files' sizes, times
and head/tail hashes, the recipe, the qtool and gguf-py versions, the header's hash, the
imatrix's hash). A run killed at any moment (SIGKILL, power loss) leaves a consistent
checkpoint; ``resume=True`` (``--resume``) checks it is this very run's (identity, the header
bytes in the file, the last complete tensor encoded again and compared), truncates the file to
the offset and writes the remaining tensors, which gives the same bytes as an uninterrupted run.
Without ``resume`` a checkpoint left by an earlier run is refused rather than silently replaced
or continued. Ctrl-C or a failure of a run given ``resume`` records the tensors complete so far
(bad input aside, which a rerun would meet again), so the same command continues it; without
``resume`` it removes the folder (nothing is left behind, as for every output), so only a hard
kill leaves one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState
from qtool.kernels.types import get_type

from qtool import interrupt
from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, CorruptFileError
from qtool.events import SILENT, Reporter
from qtool.io import (
    check_writable,
    file_identity,
    first_difference,
    fsync_dir,
    output_errors,
    write_state,
)
from qtool.models import Family, GGUFTensor
from qtool.policy import (
    FLOAT_TYPES,
    PRESETS,
    allows_quantization,
    facts_for,
    llama_order,
    plan_types,
    resolve_preset,
)
from qtool.runner.memory import release_freed


@dataclass(frozen=True)
class PlanEntry:
    name: str  # llama.cpp's name
    shape: tuple[int, ...]  # PyTorch order (rows, row length)
    qtype: str
    nbytes: int
    tensor: GGUFTensor = field(compare=False)
    source_type: str = ""  # the type in a GGUF source (requantization warnings)

    @property
    def hf_name(self) -> str | None:
        return self.tensor.hf_name


@dataclass
class GGUFPlan:
    preset: str
    arch: str
    entries: list[PlanEntry]
    vocab: dict[str, Any] = field(default_factory=dict)
    file_type: int | None = None  # general.file_type; None: the preset's

    @property
    def ftype(self) -> int:
        return PRESETS[self.preset][1] if self.file_type is None else self.file_type

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.qtype] = counts.get(e.qtype, 0) + 1
        return counts


def source_tensors(src: Checkpoint, family: Family) -> list[GGUFTensor]:
    """The GGUF tensors a source gives: the family's conversion of an HF checkpoint, or the
    tensors of a GGUF file as they are."""
    if src.format == "gguf":
        return [
            GGUFTensor(n, tuple(t.shape), (n,), float_only=len(t.shape) == 1)
            for n, t in src.tensors.items()
        ]
    return family.gguf_tensors(src.tensors)


def make_plan(
    src: Checkpoint,
    family: Family,
    preset: str,
    *,
    overrides: Sequence[tuple[str, str]] = (),
    output_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    has_imatrix: bool = False,
) -> GGUFPlan:
    """Every tensor of the GGUF file with its type and size, from headers alone."""
    preset = resolve_preset(preset)
    tensors = source_tensors(src, family)
    base = PRESETS[preset][0] if PRESETS[preset][0] in FLOAT_TYPES else "F16"
    src_types = {}
    for t in tensors:
        if src.format == "gguf":
            src_types[t.name] = src.tensors[t.name].dtype
        elif t.encoded_type is not None:
            src_types[t.name] = t.encoded_type
        else:
            src_types[t.name] = "F32" if t.float_only else base
    entries_in = [(t.name, t.shape, src_types[t.name]) for t in tensors]
    try:
        types = plan_types(
            entries_in,
            preset,
            facts_for(family),
            overrides=overrides,
            output_type=output_type,
            token_embedding_type=token_embedding_type,
            pure=pure,
            has_imatrix=has_imatrix,
        )
    except KeyError as e:
        raise BadInputError(str(e).strip('"')) from e
    by_name = {t.name: t for t in tensors}
    default = get_type(PRESETS[preset][0])
    float_preset = default.name in FLOAT_TYPES
    entries = []
    for name in llama_order(by_name):
        t = by_name[name]
        qtype = "F32" if t.float_only and src.format != "gguf" else types[name]
        if t.encoded_type is not None and float_preset:
            qtype = t.encoded_type  # carried over as stored, as llama.cpp's converter does
        q = get_type(qtype)
        if pure and allows_quantization(name, len(t.shape)) and t.shape[-1] % default.block_size:
            # llama-quantize --pure would still fall back here; one type was asked for.
            raise BadInputError(
                f"tensor {name}: rows of {t.shape[-1]} do not divide into {default.name} blocks "
                f"of {default.block_size} (--pure asks for one type everywhere)",
                hint="drop --pure to fall back as llama.cpp does, or pick a 32-block type",
            )
        n = int(np.prod(t.shape))
        entries.append(
            PlanEntry(name, t.shape, q.name, n // q.block_size * q.type_size, t, src_types[name])
        )
    file_type = None
    if src.format != "gguf":
        file_type = family.gguf_file_type(PRESETS[preset][1], float_preset)
    return GGUFPlan(preset, family.gguf_arch, entries, file_type=file_type)


def encode(x: np.ndarray, qtype: str, imatrix: np.ndarray | None, name: str) -> np.ndarray:
    """float32 rows -> the bytes (or floats) GGUF stores for ``qtype``."""
    if qtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    from qtool.kernels import quantize

    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return quantize(rows, qtype, imatrix, name=name)


# The encoded rows of a tensor a method already quantized (HF row order), or None: encode the
# float rows here (round-to-nearest, llama-quantize's bytes).
Payloads = Callable[[PlanEntry], Any]


def write_gguf(
    path: Path,
    plan: GGUFPlan,
    src: Checkpoint,
    family: Family,
    *,
    payloads: Payloads | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    tokenizer_pre: str | None = None,
    extra_kv: dict[str, str] | None = None,
    reporter: Reporter = SILENT,
    resume: bool = False,
    identity: dict[str, Any] | None = None,
    resume_hint: str = "--resume",
    verify: Callable[[Path], None] | None = None,
) -> int:
    """Write the GGUF described by ``plan``; return the file size. ``extra_kv``: string
    metadata added (``qtool.recipe``). ``resume``: continue this run's checkpoint when one is
    beside ``path`` (see the module docstring); ``identity``: what makes two runs the same run
    (:func:`run_identity`; by default the source files alone, the header covering the rest);
    ``resume_hint``: how the caller continues a run, for the message refusing a checkpoint;
    ``verify``: called with the complete file before it replaces ``path`` (raise to refuse it:
    nothing is published)."""
    path = Path(path).expanduser()
    check_writable(path)
    w = gguf.GGUFWriter(None, plan.arch)
    header = _header_bytes(w, plan, src, family, tokenizer_pre, extra_kv)
    sizes = [e.nbytes for e in plan.entries]
    content = {
        "header_sha256": hashlib.sha256(header).hexdigest(),
        "header_bytes": len(header),
        "alignment": w.data_alignment,
        "tensors_sha256": hashlib.sha256(
            json.dumps([[e.name, e.qtype, list(e.shape), e.nbytes] for e in plan.entries]).encode()
        ).hexdigest(),
        "imatrix_sha256": _imatrix_sha256(imatrix),
    }
    with output_errors(path):
        partial = PartialGGUF.open(
            path,
            identity if identity is not None else run_identity(src),
            content,
            header,
            sizes,
            w.data_alignment,
            resume=resume,
            hint=resume_hint,
        )
    try:
        with output_errors(path):
            start = partial.done
            if start:
                _check_last_tensor(partial, plan, src, family, imatrix or {}, payloads)
                partial.truncate()
                reporter.info(f"resuming {path.name}: {start} of {len(sizes)} tensors were written")
            else:
                partial.write_header()
            for e in plan.entries[:start]:
                w.tensors[0].pop(e.name)
            w.fout = [partial.file]
            w.state = WriterState.WEIGHTS if start else WriterState.TI_DATA
            _stream_tensors(
                src,
                family,
                plan,
                w,
                reporter,
                imatrix or {},
                payloads,
                path.name,
                start=start,
                on_tensor=partial.tensor_done,
            )
            w.fout = None
            partial.finish(verify)
    except BaseException as e:
        w.fout = None
        if partial.abort(e):
            reporter.warn(
                f"{path.name}: {partial.completed} of {len(sizes)} tensors kept in "
                f"{partial.folder}; the same command continues"
            )
        raise
    return path.stat().st_size


def _header_bytes(
    w: gguf.GGUFWriter,
    plan: GGUFPlan,
    src: Checkpoint,
    family: Family,
    tokenizer_pre: str | None,
    extra_kv: dict[str, str] | None,
) -> bytes:
    """Metadata and tensor infos into ``w``; the header bytes they make (written in memory,
    so a resumed run can compare them with the partial file's). ``w`` is left ready for the
    tensor data."""
    from qtool.formats.gguf_vocab import write_vocab

    if src.format == "gguf":
        _copy_metadata(w, src)
    else:
        name = src.config.get("_name_or_path") or src.root.name
        w.add_name(str(name))
    w.add_file_type(plan.ftype)
    if any(e.qtype not in FLOAT_TYPES for e in plan.entries):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if src.format != "gguf":
        family.write_gguf_metadata(w)
        plan.vocab = write_vocab(w, src.root, family.cfg, tokenizer_pre=tokenizer_pre)
    else:
        plan.vocab = _vocab_summary(src)
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v)
    for e in plan.entries:
        if e.qtype == "F32":
            w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes)
        else:
            byte_shape = (*e.shape[:-1], e.nbytes // max(1, int(np.prod(e.shape[:-1]))))
            w.add_tensor_info(
                e.name,
                byte_shape,
                np.dtype(np.uint8),
                e.nbytes,
                raw_dtype=gguf.GGMLQuantizationType[e.qtype],
            )
    buf = io.BytesIO()
    w.fout = [buf]  # type: ignore[list-item]
    w.state = WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.fout = None
    return buf.getvalue()


def _imatrix_sha256(imatrix: dict[str, np.ndarray] | None) -> str | None:
    if not imatrix:
        return None
    h = hashlib.sha256()
    for name in sorted(imatrix):
        h.update(name.encode())
        h.update(np.ascontiguousarray(imatrix[name], dtype=np.float32).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the checkpoint: OUT.qtool-partial/{data.part, state.json, lock}
# --------------------------------------------------------------------------------------------

PARTIAL_SUFFIX = ".qtool-partial"
PARTIAL_VERSION = 1
STATE = "state.json"
DATA = "data.part"
LOCK = "lock"
# After a tensor, a checkpoint (data synced, state.json replaced) once this much tensor data or
# time has passed since the last one: a crash loses at most about that much work.
CHECKPOINT_BYTES = 256 * 2**20
CHECKPOINT_SECONDS = 30.0


def partial_path(path: Path | str) -> Path:
    """The checkpoint folder of the GGUF output ``path``: ``OUT.qtool-partial`` beside it."""
    path = Path(path).expanduser()
    return path.with_name(path.name + PARTIAL_SUFFIX)


def run_identity(
    src: Checkpoint, recipe: dict[str, Any] | None = None, output: int | None = None
) -> dict[str, Any]:
    """What makes two GGUF writes the same run, from what is known before any work: the
    source files (size, modification time, head/tail hash), the recipe (all defaults filled
    in, no paths) and which of its outputs this is, the qtool and gguf-py versions. The header
    bytes, the tensor plan and the imatrix are compared too, once the header is made."""
    from importlib.metadata import PackageNotFoundError, version

    from qtool import __version__

    try:
        gguf_py = version("gguf")
    except PackageNotFoundError:  # pragma: no cover - gguf-py from a source tree
        gguf_py = "unknown"
    return {
        "qtool_version": __version__,
        "gguf_py_version": gguf_py,
        "source": {
            "format": src.format,
            "files": [file_identity(f) for f in sorted(src.files, key=lambda f: Path(f).name)],
        },
        "recipe": recipe,
        "output_index": output,
    }


def _offsets(header_len: int, sizes: Sequence[int], align: int) -> list[int]:
    """offsets[k]: the end of the file once k tensors are written (each padded to ``align``;
    offsets[0]: the header alone, the first tensor's padding coming with the tensor)."""
    out = [header_len]
    pos = gguf.GGUFWriter.ggml_pad(header_len, align)
    for n in sizes:
        pos += gguf.GGUFWriter.ggml_pad(n, align)
        out.append(pos)
    return out


def _lock(folder: Path) -> int | None:
    """An exclusive lock on ``folder/lock``: its descriptor, or None when another process holds
    it. Where ``fcntl`` is missing, no lock (-1)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)  # closing the descriptor releases the lock


def _busy(path: Path, folder: Path) -> BadInputError:
    return BadInputError(
        f"{path}: another qtool process is writing it now ({folder} is locked)",
        hint="wait for that run to end, or stop it",
    )


def _read_state(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's state; None when there is nothing to continue (no state yet, or the
    data already renamed to the output)."""
    state_file = folder / STATE
    if not state_file.is_file() or not (folder / DATA).is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{state_file}: unreadable ({e})", hint=f"delete {folder}") from e
    if not isinstance(state, dict) or state.get("qtool_partial") != PARTIAL_VERSION:
        raise BadInputError(
            f"{folder}: not a checkpoint this qtool can continue",
            hint=f"delete {folder} to start over",
        )
    return state


_CONTENT = {
    "header_sha256": "the GGUF header (config, tokenizer or metadata)",
    "header_bytes": "the GGUF header (config, tokenizer or metadata)",
    "tensors_sha256": "the tensors' types",
    "imatrix_sha256": "the imatrix",
    "alignment": "the data alignment",
}


def _refuse(
    path: Path,
    folder: Path,
    state: dict[str, Any],
    mine: dict[str, Any],
    *,
    resume: bool,
    hint: str,
) -> None:
    """Refuse a checkpoint this run may not continue: any without ``resume``, another run's
    with it (``mine``: the parts of this run's identity known so far)."""
    done = f"{state.get('tensors_done', 0)} of {state.get('tensors', '?')} tensors"
    if not resume:
        raise BadInputError(
            f"{path}: an interrupted run left {done} in {folder}",
            hint=f"continue it with {hint}, or delete {folder} to start over",
        )
    theirs = {k: state.get(k) for k in mine}
    diff = first_difference(theirs, mine).removeprefix("identity.")
    if diff.startswith("content."):
        what = diff.split(":")[0].removeprefix("content.")
        diff = _CONTENT.get(what, what)
    if diff:
        raise BadInputError(
            f"{folder}: the checkpoint of another run ({done}; differs in {diff})",
            hint=f"rerun with that run's options to continue it, or delete {folder}",
        )


def check_partial(
    path: Path | str, identity: dict[str, Any], *, resume: bool, hint: str = "--resume"
) -> None:
    """Before any work: refuse a checkpoint beside ``path`` that this run may not continue
    (see :func:`write_gguf`), so that nothing is computed in vain. Changes nothing."""
    path = Path(path).expanduser()
    folder = partial_path(path)
    if not folder.is_dir():
        return
    fd = _lock(folder)
    if fd is None:
        raise _busy(path, folder)
    try:
        state = _read_state(folder)
        if state is not None:
            _refuse(path, folder, state, {"identity": identity}, resume=resume, hint=hint)
    finally:
        _unlock(fd)


class PartialGGUF:
    """One GGUF output being written: the partial file, its state and lock (see the module
    docstring). ``done``: complete tensors found in a checkpoint this run continues."""

    def __init__(
        self,
        path: Path,
        folder: Path,
        lock: int | None,
        state: dict[str, Any],
        offsets: list[int],
        align: int,
        header: bytes,
        *,
        resume: bool,
        created: bool,
    ) -> None:
        self.path = path
        self.folder = folder
        self.lock = lock
        self.state = state
        self.offsets = offsets
        self.align = align
        self.header = header
        self.resume = resume
        self.created = created  # the folder is this run's (remove it if nothing comes of it)
        self.done = int(state.get("tensors_done", 0))
        self.completed = self.done  # complete tensors in the file
        self.modified = False  # this run changed the partial file
        self.file: Any = None
        self._last = (time.monotonic(), self.offsets[self.done])

    @property
    def data(self) -> Path:
        return self.folder / DATA

    @classmethod
    def open(
        cls,
        path: Path,
        identity: dict[str, Any],
        content: dict[str, Any],
        header: bytes,
        sizes: Sequence[int],
        align: int,
        *,
        resume: bool,
        hint: str,
    ) -> PartialGGUF:
        """Take the output's checkpoint folder: refuse one this run may not continue (nothing
        changed), else return it, continuing (``done`` > 0) or fresh."""
        folder = partial_path(path)
        created = not folder.exists()
        folder.mkdir(exist_ok=True)
        fd = _lock(folder)
        if fd is None:
            raise _busy(path, folder)
        offsets = _offsets(len(header), sizes, align)
        mine = {"identity": identity, "content": content}
        fresh = {
            "qtool_partial": PARTIAL_VERSION,
            "output": path.name,
            **mine,
            "tensors": len(sizes),
            "tensors_done": 0,
            "offset": offsets[0],
        }
        try:
            state = _read_state(folder)
            if state is None:
                for old in folder.iterdir():  # an earlier run's leftovers, nothing to continue
                    if old.name != LOCK:
                        shutil.rmtree(old) if old.is_dir() else old.unlink()
                return cls(
                    path, folder, fd, fresh, offsets, align, header, resume=resume, created=True
                )
            _refuse(path, folder, state, mine, resume=resume, hint=hint)
            done = int(state["tensors_done"])
            if not 0 <= done <= len(sizes) or state.get("offset") != offsets[done]:
                raise CorruptFileError(
                    f"{folder / STATE}: inconsistent ({done} tensors at byte "
                    f"{state.get('offset')})",
                    hint=f"delete {folder} to start over",
                )
            size = (folder / DATA).stat().st_size
            if size < offsets[done]:
                raise CorruptFileError(
                    f"{folder / DATA}: {size} bytes, shorter than its checkpoint "
                    f"({offsets[done]} bytes)",
                    hint=f"delete {folder} to start over",
                )
            with open(folder / DATA, "rb") as f:
                if f.read(len(header)) != header:
                    raise BadInputError(
                        f"{folder}: its header is not the one this run writes",
                        hint=f"delete {folder} to start over",
                    )
            part = cls(path, folder, fd, state, offsets, align, header, resume=True, created=False)
            part.file = open(folder / DATA, "r+b")  # noqa: SIM115 - closed by finish/abort
            return part
        except BaseException:
            _unlock(fd)
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def tensor_start(self, k: int) -> int:
        """Where tensor ``k``'s data begins in the file."""
        return gguf.GGUFWriter.ggml_pad(self.offsets[k], self.align)

    def truncate(self) -> None:
        """Drop whatever follows the last complete tensor (a tensor cut short by the kill)."""
        self.modified = True
        self.file.truncate(self.offsets[self.done])
        self.file.seek(self.offsets[self.done])

    def write_header(self) -> None:
        self.file = open(self.data, "w+b")  # noqa: SIM115 - closed by finish/abort
        self.modified = True
        self.file.write(self.header)
        self.checkpoint(0)

    def tensor_done(self, k: int) -> None:
        """Tensor ``k - 1`` is complete (padding included): checkpoint when it is time."""
        self.completed = k
        t0, off0 = self._last
        if (
            self.offsets[k] - off0 >= CHECKPOINT_BYTES
            or time.monotonic() - t0 >= CHECKPOINT_SECONDS
        ):
            self.checkpoint(k)

    def checkpoint(self, k: int) -> None:
        """The first ``k`` tensors made durable, then recorded."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.state = {**self.state, "tensors_done": k, "offset": self.offsets[k]}
        write_state(self.folder / STATE, self.state)
        self._last = (time.monotonic(), self.offsets[k])

    def finish(self, verify: Callable[[Path], None] | None = None) -> None:
        """The complete file synced, checked by ``verify`` and renamed over the output; the
        checkpoint removed."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if verify is not None:
            verify(self.data)
        interrupt.check()  # never publish an output after Ctrl-C (one swallowed included)
        os.replace(self.data, self.path)
        fsync_dir(self.path.resolve().parent)
        shutil.rmtree(self.folder, ignore_errors=True)
        _unlock(self.lock)

    def abort(self, exc: BaseException) -> bool:
        """After Ctrl-C or a failure: with ``resume`` keep the checkpoint, brought up to the
        last complete tensor (True), unless none is complete or the input is at fault; else
        remove what this run wrote. A checkpoint this run did not change stays as it was."""
        keep = self.resume and self.completed > 0 and not isinstance(exc, BadInputError)
        if self.file is not None:
            if keep and self.modified:
                try:
                    self.checkpoint(self.completed)
                except Exception:  # noqa: BLE001 - the last checkpoint stands
                    pass
            try:
                self.file.close()
            except OSError:
                pass
        _unlock(self.lock)
        if (self.modified and not keep) or (self.created and not self.modified):
            shutil.rmtree(self.folder, ignore_errors=True)
        return keep and self.modified


def _tensor_data(
    src: Checkpoint,
    family: Family,
    e: PlanEntry,
    imatrix: dict[str, np.ndarray],
    payloads: Payloads | None,
) -> Iterator[np.ndarray]:
    """A tensor's bytes as GGUF stores them, whole or in row chunks."""
    ready = payloads(e) if payloads is not None else None
    if ready is not None:
        yield np.ascontiguousarray(_encoded_rows(src, family, e, ready))
        return
    t = e.tensor
    if t.encoded is not None and e.qtype == t.encoded_type:  # the source's own bytes
        for data in t.encoded(_LazySources(src, t.sources)):
            yield np.ascontiguousarray(data, dtype=np.uint8)
        return
    imat = imatrix.get(e.name) if get_type(e.qtype).block_size > 1 else None
    row = 0
    for x in float_chunks(src, family, e):
        for data in _encode_rows(x, e, imat, row):
            yield np.ascontiguousarray(data)
        row += x.size // e.shape[-1]
        del x


def _check_last_tensor(
    partial: PartialGGUF,
    plan: GGUFPlan,
    src: Checkpoint,
    family: Family,
    imatrix: dict[str, np.ndarray],
    payloads: Payloads | None,
) -> None:
    """The last complete tensor of the checkpoint made again and compared with the file: a
    source, imatrix or qtool changed behind the identity's back is caught here."""
    k = partial.done - 1
    e = plan.entries[k]
    f = partial.file
    f.seek(partial.tensor_start(k))
    n = 0
    for data in _tensor_data(src, family, e, imatrix, payloads):
        b = data.data.cast("B")
        if f.read(len(b)) != b:
            raise BadInputError(
                f"{partial.folder}: tensor {e.name} there is not what this run writes (the "
                "source, the imatrix or qtool changed since that run)",
                hint=f"delete {partial.folder} to start over",
            )
        n += len(b)
    if n != e.nbytes:
        raise AssertionError(f"{e.name}: encoded {n} bytes, planned {e.nbytes}")


# keys written anew: the architecture (by the writer), the file type, and qtool's own record
_SKIP_KV = ("general.architecture", "general.file_type", "general.quantization_version")
_SKIP_PREFIX = ("GGUF.", "qtool.")


def _copy_metadata(w: gguf.GGUFWriter, src: Checkpoint) -> None:
    """Every key of a GGUF source but its file type, as llama-quantize copies them."""
    reader = gguf.GGUFReader(str(src.gguf_path))
    for f in reader.fields.values():
        if f.name.startswith(_SKIP_PREFIX) or f.name in _SKIP_KV:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)


def _vocab_summary(src: Checkpoint) -> dict[str, Any]:
    m = src.gguf_metadata
    return {
        "model": m.get("tokenizer.ggml.model"),
        "pre": m.get("tokenizer.ggml.pre"),
        "tokens": len(m.get("tokenizer.ggml.tokens") or []),
    }


# Row chunks of about this many float32 bytes bound the memory a large tensor needs.
CHUNK_BYTES = 32 * 2**20


def _stream_tensors(
    src: Checkpoint,
    family: Family,
    plan: GGUFPlan,
    w: gguf.GGUFWriter,
    reporter: Reporter,
    imatrix: dict[str, np.ndarray],
    payloads: Payloads | None,
    label: str,
    *,
    start: int = 0,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Write the tensors from ``start`` on; ``on_tensor(k)`` once the first k are complete."""
    t0 = time.monotonic()
    task = reporter.task(f"writing {label}", plan.tensor_bytes)
    try:
        if start:
            task.advance(sum(e.nbytes for e in plan.entries[:start]))
        for k in range(start, len(plan.entries)):
            e = plan.entries[k]
            fout = _begin_tensor(w, e.nbytes)
            written = 0
            for data in _tensor_data(src, family, e, imatrix, payloads):
                fout.write(data.data.cast("B"))
                written += data.nbytes
                task.advance(data.nbytes)
                del data
            if written != e.nbytes:
                raise AssertionError(f"{e.name}: encoded {written} bytes, planned {e.nbytes}")
            w.write_padding(fout, e.nbytes)
            release_freed()
            if on_tensor is not None:
                on_tensor(k + 1)
    finally:
        reporter.done(task)
    reporter.debug(f"streamed {len(plan.entries) - start} tensors in {time.monotonic() - t0:.1f}s")


def _encode_rows(
    x: np.ndarray, e: PlanEntry, imat: np.ndarray | None, row: int
) -> Iterator[np.ndarray]:
    """Encode a chunk of float rows starting at row ``row`` of the tensor. A 3-D (MoE experts)
    tensor's imatrix holds one vector per expert (llama-imatrix's layout): each expert's rows
    use their own, as ``llama_tensor_quantize_impl`` does (chunks stop at expert boundaries)."""
    cols = e.shape[-1]
    if imat is None or len(e.shape) < 3 or imat.size == cols:
        yield encode(x, e.qtype, imat, e.name)
        return
    per_expert = int(np.prod(e.shape[1:-1]))
    if imat.size != e.shape[0] * cols:
        raise BadInputError(
            f"imatrix entry {e.name}: {imat.size} values, the tensor needs {cols} or "
            f"{e.shape[0]} x {cols} (one per expert)"
        )
    rows = x.reshape(-1, cols)
    r = 0
    while r < rows.shape[0]:
        expert = (row + r) // per_expert
        stop = min(rows.shape[0], (expert + 1) * per_expert - row)
        yield encode(rows[r:stop], e.qtype, imat[expert * cols : (expert + 1) * cols], e.name)
        r = stop


def _encoded_rows(src: Checkpoint, family: Family, e: PlanEntry, ready: Any) -> np.ndarray:
    """A method's encoded tensor (GGUFWeight, HF row order) in llama.cpp's row order."""
    if ready.qtype != e.qtype:
        raise AssertionError(f"{e.name}: quantized as {ready.qtype}, planned {e.qtype}")
    data = np.asarray(ready.data)
    if src.format != "gguf" and e.hf_name is not None:
        data = family.rows_to_gguf(e.hf_name, data)
    return data


def read_float(src: Checkpoint, name: str) -> np.ndarray:
    """One source tensor as float32 numpy: an HF tensor as stored, a GGUF tensor decoded. An
    HF tensor of bytes (packed codes and scales: gpt-oss's MXFP4 experts) comes as stored,
    uint8, for the family's ``build`` to decode."""
    if src.format == "gguf":
        from qtool.gguf_meta import read_gguf_tensor

        return read_gguf_tensor(src, name)
    return _as_numpy(src.read(name))


def _as_numpy(t: Any) -> np.ndarray:
    """A tensor as :func:`read_float` gives it: bytes (uint8) as stored, anything else float32."""
    import torch

    return t.numpy() if t.dtype == torch.uint8 else t.to(torch.float32).numpy()


def float_chunks(src: Checkpoint, family: Family, e: PlanEntry) -> Iterator[np.ndarray]:
    """The tensor as float32 in llama.cpp's layout, whole or in row chunks of ~CHUNK_BYTES."""
    t = e.tensor
    if t.build is not None:
        parts = t.build(_LazySources(src, t.sources))
    elif src.format == "gguf":
        parts = _gguf_row_chunks(src, e)
    else:
        parts = _hf_chunks(src, family, e)
    for x in parts:
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise BadInputError(f"tensor {e.hf_name or e.name} contains NaN or Inf values")
        yield x


class _LazySources(Sequence[np.ndarray]):
    """The source tensors of a merged tensor, each read when indexed: a ``build`` that takes
    them one at a time (MoE experts) holds one in memory, not all."""

    def __init__(self, src: Checkpoint, names: tuple[str, ...]) -> None:
        self.src, self.names = src, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [read_float(self.src, n) for n in self.names[i]]
        return read_float(self.src, self.names[i])

    def rows(self, i: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of source ``i`` (its first dimension: one expert of a fused
        tensor), read alone; as :func:`read_float` gives them."""
        if self.src.format != "safetensors":
            return self[i][start:stop]
        return _as_numpy(self.src.read_rows(self.names[i], start, stop))


def _row_step(shape: tuple[int, ...]) -> int:
    row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, CHUNK_BYTES // (4 * row_elems))


def _hf_chunks(src: Checkpoint, family: Family, e: PlanEntry) -> Iterator[np.ndarray]:
    import torch

    name = e.tensor.sources[0]
    rows, step = e.shape[0], _row_step(e.shape)
    if len(e.shape) == 1 or rows <= step or not family.rows_independent(name):
        yield family.to_gguf(name, src.read(name).to(torch.float32).numpy())
        return
    for r in range(0, rows, step):  # rows stream as stored; the transform at most drops rows
        yield src.read_rows(name, r, min(rows, r + step)).to(torch.float32).numpy()


def _gguf_row_chunks(src: Checkpoint, e: PlanEntry) -> Iterator[np.ndarray]:
    from qtool.gguf_meta import dequantize_rows

    info = src.tensors[e.name]
    n = info.shape[-1]
    rows = info.numel // n
    row_bytes = info.nbytes // rows
    raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    step = _row_step((rows, n))
    for r in range(0, rows, step):
        stop = min(rows, r + step)
        data = np.asarray(raw[r * row_bytes : stop * row_bytes]).reshape(stop - r, row_bytes)
        x = dequantize_rows(data, info.dtype, n, e.name)
        yield x.reshape(info.shape if len(info.shape) == 1 else (stop - r, *info.shape[1:]))


def _begin_tensor(w: gguf.GGUFWriter, nbytes: int) -> Any:
    """Start the next tensor's data in gguf-py's writer (what ``write_tensor_data`` does before
    writing), so a tensor can be written in pieces; the caller pads after it."""
    if w.state not in (WriterState.TI_DATA, WriterState.WEIGHTS) or w.fout is None:
        raise AssertionError(f"GGUF writer in state {w.state}, expected tensor data")
    fout = w.fout[0]
    name = next(iter(w.tensors[0]))
    info = w.tensors[0].pop(name)
    if info.nbytes != nbytes:
        raise AssertionError(f"{name}: writer expects {info.nbytes} bytes, plan has {nbytes}")
    w.write_padding(fout, fout.tell())
    w.state = WriterState.WEIGHTS
    return fout
