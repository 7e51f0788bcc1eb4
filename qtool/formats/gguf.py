"""The GGUF format: plan every tensor's type, then stream read-convert-encode-write.

The plan comes from the model family (:meth:`qtool.models.Family.gguf_tensors`: HF tensors
renamed and transformed, generated tensors such as Llama 3's ``rope_freqs``, merged ones such
as MoE experts) or, for a GGUF source, from the file's own tensors; each tensor's type is
llama-quantize's choice (:mod:`qtool.policy`). Tensor data then comes one tensor at a time,
either already encoded by a method (GPTQ's codes on the tensor's GGUF grid, BitNet's trits:
rows in HF order, reordered by the family as llama.cpp's converter reorders them) or as float
rows encoded here by the codecs, which is round-to-nearest exactly as ``llama-quantize`` does it.

Memory holds one tensor at a time (its source rows, their float32 copy and their encoded bytes),
so it grows with the largest tensor, not with the depth. The file is written under a temporary
name beside the target and renamed when complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState
from qtool.kernels.types import get_type

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError
from qtool.events import SILENT, Reporter
from qtool.io import atomic_path
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
    entries = []
    for name in llama_order(by_name):
        t = by_name[name]
        qtype = "F32" if t.float_only and src.format != "gguf" else types[name]
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
    return GGUFPlan(preset, family.gguf_arch, entries)


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
) -> int:
    """Write the GGUF described by ``plan``; return the file size. ``extra_kv``: string
    metadata added (``qtool.recipe``)."""
    from qtool.formats.gguf_vocab import write_vocab

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(None, plan.arch)
        try:
            if src.format == "gguf":
                _copy_metadata(w, src)
            else:
                name = src.config.get("_name_or_path") or src.root.name
                w.add_name(str(name))
            w.add_file_type(PRESETS[plan.preset][1])
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
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            _stream_tensors(src, family, plan, w, reporter, imatrix or {}, payloads, path.name)
        finally:
            w.close()
    return path.stat().st_size


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
) -> None:
    start = time.monotonic()
    task = reporter.task(f"writing {label}", plan.tensor_bytes)
    try:
        for e in plan.entries:
            fout = _begin_tensor(w, e.nbytes)
            written = 0
            ready = payloads(e) if payloads is not None else None
            if ready is not None:
                data = _encoded_rows(src, family, e, ready)
                fout.write(np.ascontiguousarray(data).data.cast("B"))
                written = data.nbytes
                task.advance(data.nbytes)
            else:
                imat = imatrix.get(e.name) if get_type(e.qtype).block_size > 1 else None
                row = 0
                for x in float_chunks(src, family, e):
                    for data in _encode_rows(x, e, imat, row):
                        fout.write(np.ascontiguousarray(data).data.cast("B"))
                        written += data.nbytes
                        task.advance(data.nbytes)
                    row += x.size // e.shape[-1]
                    del x
            if written != e.nbytes:
                raise AssertionError(f"{e.name}: encoded {written} bytes, planned {e.nbytes}")
            w.write_padding(fout, e.nbytes)
    finally:
        reporter.done(task)
    reporter.debug(f"streamed {len(plan.entries)} tensors in {time.monotonic() - start:.1f}s")


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
    """One source tensor as float32 numpy: an HF tensor as stored, a GGUF tensor decoded."""
    if src.format == "gguf":
        from qtool.gguf_meta import read_gguf_tensor

        return read_gguf_tensor(src, name)
    import torch

    return src.read(name).to(torch.float32).numpy()


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
