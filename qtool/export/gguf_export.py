"""HF checkpoint -> GGUF: plan every tensor's type, then stream read-convert-encode-write.

Memory holds one tensor at a time (its source, its float32 copy and its encoded bytes), so it
grows with the largest tensor, not with the number of layers. The file is written under a
temporary name beside the target and renamed when complete.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.gguf_writer import WriterState

from qtool.arch import ModelSpec, gguf_name
from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, OutputError, UnsupportedError
from qtool.export.archs import GGUFArch, arch_for
from qtool.export.vocab import write_vocab
from qtool.footprint import policy_facts
from qtool.io import check_writable
from qtool.kernels.types import get_type
from qtool.output import Output
from qtool.policy import PRESETS, allows_quantization, llama_order, plan_types, resolve_preset


@dataclass(frozen=True)
class PlanEntry:
    hf_name: str
    name: str  # llama.cpp's name
    shape: tuple[int, ...]  # PyTorch order (rows, row length)
    qtype: str
    nbytes: int


@dataclass
class ExportPlan:
    preset: str
    arch: str
    entries: list[PlanEntry]
    metadata_note: str = ""
    vocab: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.qtype] = counts.get(e.qtype, 0) + 1
        return counts


def make_plan(
    ckpt: Checkpoint,
    preset: str,
    *,
    overrides: Sequence[tuple[str, str]] = (),
    output_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    has_imatrix: bool = False,
) -> tuple[ExportPlan, GGUFArch]:
    if ckpt.format != "safetensors":
        raise UnsupportedError(
            f"{ckpt.source}: GGUF export reads HF safetensors checkpoints; this is {ckpt.format}",
            hint="to requantize a GGUF, use llama-quantize, or export from the original checkpoint",
        )
    preset = resolve_preset(preset)
    arch = arch_for(ckpt.config, ckpt.root)
    spec = ModelSpec.from_config(ckpt.config)
    rows: list[tuple[str, str, tuple[int, ...]]] = []
    for info in ckpt.tensors.values():
        if arch.skip(info.name):
            continue
        g = gguf_name(info.name, spec.model_type, spec.n_layers)
        if g is None:
            raise UnsupportedError(
                f"tensor {info.name} has no llama.cpp name for {spec.model_type}",
                hint="this checkpoint has tensors the llama.cpp architecture does not use",
            )
        rows.append((info.name, g, arch.shape_after(info.name, info.shape)))
    base = PRESETS[preset][0] if PRESETS[preset][0] in ("F32", "F16", "BF16") else "F16"
    entries_in = [(g, shape, "F32" if len(shape) == 1 else base) for _, g, shape in rows]
    try:
        types = plan_types(
            entries_in,
            preset,
            policy_facts(spec),
            overrides=overrides,
            output_type=output_type,
            token_embedding_type=token_embedding_type,
            pure=pure,
            has_imatrix=has_imatrix,
        )
    except KeyError as e:
        raise BadInputError(str(e).strip('"')) from e
    by_gguf = {g: (hf, shape) for hf, g, shape in rows}
    default = get_type(PRESETS[preset][0])
    entries = []
    for g in llama_order(by_gguf):
        hf, shape = by_gguf[g]
        q = get_type(types[g])
        if pure and allows_quantization(g, len(shape)) and shape[-1] % default.block_size:
            # llama-quantize --pure would still fall back here; one type was asked for.
            raise BadInputError(
                f"tensor {g}: rows of {shape[-1]} do not divide into {default.name} blocks of "
                f"{default.block_size} (--pure asks for one type everywhere)",
                hint="drop --pure to fall back as llama.cpp does, or pick a 32-block type",
            )
        n = int(np.prod(shape))
        entries.append(PlanEntry(hf, g, shape, q.name, n // q.block_size * q.type_size))
    return ExportPlan(preset, arch.gguf_arch, entries), arch


def encode(x: np.ndarray, qtype: str, imatrix: np.ndarray | None, name: str) -> np.ndarray:
    """float32 rows -> the bytes (or floats) GGUF stores for ``qtype``."""
    if qtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    from qtool.kernels import quantize

    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return quantize(rows, qtype, imatrix, name=name)


# ``(hf_name, float32 rows) -> float32 rows`` of the same shape, applied to every tensor planned
# as a quantized (non-float) type before encoding; a row chunk of a large tensor may be passed.
Transform = Callable[[str, np.ndarray], np.ndarray]


def export_gguf(
    ckpt: Checkpoint,
    out_path: Path,
    plan: ExportPlan,
    arch: GGUFArch,
    out: Output,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
    tokenizer_pre: str | None = None,
    transform: Transform | None = None,
) -> int:
    """Write the GGUF described by ``plan``; return the file size. ``transform`` rewrites the
    float rows of quantized tensors before encoding (BitNet ternarizes its linear weights)."""
    check_writable(out_path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.expanduser().resolve().parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    w = gguf.GGUFWriter(None, arch.gguf_arch)
    try:
        name = ckpt.config.get("_name_or_path") or ckpt.root.name
        w.add_name(str(name))
        w.add_file_type(PRESETS[plan.preset][1])
        if any(e.qtype not in ("F32", "F16", "BF16") for e in plan.entries):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch.write_metadata(w)
        plan.vocab = write_vocab(w, ckpt.root, arch.cfg, tokenizer_pre=tokenizer_pre)
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
        _stream_tensors(ckpt, plan, arch, w, out, imatrix or {}, transform)
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp made it private; the output is an ordinary file
        os.replace(tmp, out_path)
    except OSError as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OutputError(
                f"{out_path}: no space left on device", hint="free space and retry"
            ) from e
        raise OutputError(f"{out_path}: could not write ({e.strerror or e})") from e
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path.stat().st_size


# Row chunks of about this many float32 bytes bound the memory a large tensor needs.
CHUNK_BYTES = 32 * 2**20


def _stream_tensors(
    ckpt: Checkpoint,
    plan: ExportPlan,
    arch: GGUFArch,
    w: gguf.GGUFWriter,
    out: Output,
    imatrix: dict[str, np.ndarray],
    transform: Transform | None = None,
) -> None:
    start = time.monotonic()
    with out.progress() as bar:
        task = bar.add_task("writing GGUF", total=plan.tensor_bytes)
        for e in plan.entries:
            imat = imatrix.get(e.name) if get_type(e.qtype).block_size > 1 else None
            fout = _begin_tensor(w, e.nbytes)
            written = 0
            for x in _float_chunks(ckpt, arch, e):
                if transform is not None and e.qtype not in ("F32", "F16", "BF16"):
                    x = transform(e.hf_name, x)
                data = encode(x, e.qtype, imat, e.name)
                del x
                fout.write(np.ascontiguousarray(data).data.cast("B"))
                written += data.nbytes
                bar.advance(task, data.nbytes)
                del data
            if written != e.nbytes:
                raise AssertionError(f"{e.name}: encoded {written} bytes, planned {e.nbytes}")
            w.write_padding(fout, e.nbytes)
    out.debug(f"streamed {len(plan.entries)} tensors in {time.monotonic() - start:.1f}s")


def _float_chunks(ckpt: Checkpoint, arch: GGUFArch, e: PlanEntry) -> Iterator[np.ndarray]:
    """The tensor as float32, whole or in row chunks of about CHUNK_BYTES."""
    rows = e.shape[0]
    row_elems = int(np.prod(e.shape[1:])) if len(e.shape) > 1 else 1
    step = max(1, CHUNK_BYTES // (4 * row_elems))
    if len(e.shape) == 1 or rows <= step or not arch.rows_independent(e.hf_name):
        chunks: Iterable[torch.Tensor] = [arch.transform(e.hf_name, ckpt.read(e.hf_name))]
    else:  # rows stream as stored; a transform here at most drops trailing rows (planned)
        chunks = (ckpt.read_rows(e.hf_name, r, min(rows, r + step)) for r in range(0, rows, step))
    for t in chunks:
        x = t.to(torch.float32).numpy()
        del t
        if not np.isfinite(x).all():
            raise BadInputError(f"tensor {e.hf_name} contains NaN or Inf values")
        yield x


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
