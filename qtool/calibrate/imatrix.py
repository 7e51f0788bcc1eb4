"""Importance matrices in llama.cpp's formats, for ``llama-quantize --imatrix``.

The GGUF format is the one ``llama-imatrix`` writes and ``llama-quantize`` reads in the
llama.cpp vendored by llama-cpp-python 0.3.36 (tools/imatrix/imatrix.cpp ``save_imatrix``,
common/imatrix-loader.cpp ``common_imatrix_load``):

- key/values ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32; llama-quantize refuses a GGUF
  imatrix without these three ``imatrix.*`` keys);
- per weight ``W`` (its GGUF name, e.g. ``blk.0.attn_q.weight``), sorted by name: an F32 tensor
  ``W.in_sum2`` of ggml shape ``[n_in, 1]`` holding ``Σ x²`` per input column, and an F32
  tensor ``W.counts`` of shape ``[1, 1]`` holding the number of rows (tokens) summed.

``llama-quantize`` uses ``in_sum2 / counts`` as the per-column weights of its quantization
error. The legacy ``.dat`` format (``--output-format dat``) is written when the path ends in
``.dat``: per entry ``len, name, ncall, nval, (Σ x² / count) · ncall`` and a trailer with the
chunk count and the dataset name.

Written by a small GGUF v3 writer here (gguf-py's writer wants a path, not the temporary file
that atomic output gives); read back with gguf-py's reader.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qtool.errors import BadInputError, CorruptFileError
from qtool.io import atomic_file
from qtool.observers.stats import LinearStats

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
# gguf_type values (ggml/include/gguf.h) and GGML_TYPE_F32.
_T_UINT32, _T_STRING, _T_ARRAY = 4, 8, 9
_GGML_F32 = 0


@dataclass
class ImatrixEntry:
    """One weight's importance data: ``sums`` (Σ x², per column, per expert) and ``counts``."""

    sums: np.ndarray  # [n_mat, n_in] float32
    counts: np.ndarray  # [n_mat] float32

    @property
    def importance(self) -> np.ndarray:
        """What llama-quantize uses: ``sums / counts`` (1 where a count is 0)."""
        c = self.counts.reshape(-1, 1)
        return np.where(c > 0, self.sums / np.maximum(c, 1), 1.0).astype(np.float32)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def entries_from_stats(
    stats: Iterable[LinearStats],
    *,
    model_type: str,
    n_layers: int,
    include_output: bool = False,
    n_expert: int = 0,
) -> dict[str, ImatrixEntry]:
    """GGUF-named imatrix entries from qtool's statistics.

    ``lm_head`` becomes ``output.weight`` only with ``include_output`` (llama-imatrix leaves it
    out unless ``--process-output``). Layers without a GGUF name are skipped. MoE experts
    (``n_expert``) go into their merged 3-D tensor's entry, one row of sums and one count per
    expert, as llama-imatrix stores ``ffn_*_exps`` (an expert no token reached has count 0,
    which llama-quantize reads as uniform importance)."""
    from qtool.models import family_for

    family = family_for(
        {"model_type": model_type, "num_hidden_layers": n_layers, "num_experts": n_expert},
        strict=False,
    )
    out: dict[str, ImatrixEntry] = {}
    for st in stats:
        ref = family.expert_of(st.name) if n_expert > 1 else None
        if ref is not None:
            e = out.get(ref.gguf)
            if e is None:
                e = out[ref.gguf] = ImatrixEntry(
                    sums=np.zeros((n_expert, st.sum_sq.size), np.float32),
                    counts=np.zeros(n_expert, np.float32),
                )
            e.sums[ref.expert] = st.sum_sq.astype(np.float32)
            e.counts[ref.expert] = float(st.count)
            continue
        g = gguf_weight_name(st.name, model_type, n_layers)
        if g is None or (g == "output.weight" and not include_output):
            continue
        out[g] = ImatrixEntry(
            sums=st.sum_sq.astype(np.float32).reshape(1, -1),
            counts=np.array([float(st.count)], dtype=np.float32),
        )
    return out


def gguf_weight_name(module: str, model_type: str, n_layers: int) -> str | None:
    """llama.cpp's weight name for an HF linear module (``model.layers.0.self_attn.q_proj`` ->
    ``blk.0.attn_q.weight``), via gguf-py's tensor-name map."""
    from qtool.models import family_for

    family = family_for({"model_type": model_type, "num_hidden_layers": n_layers}, strict=False)
    return family.gguf_name(f"{module}.weight")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _gguf_str(key) + struct.pack("<II", _T_UINT32, v)


def _kv_str(key: str, v: str) -> bytes:
    return _gguf_str(key) + struct.pack("<I", _T_STRING) + _gguf_str(v)


def _kv_str_array(key: str, vs: list[str]) -> bytes:
    body = b"".join(_gguf_str(v) for v in vs)
    return _gguf_str(key) + struct.pack("<IIQ", _T_ARRAY, _T_STRING, len(vs)) + body


def _pad(n: int) -> int:
    return (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT


def write_gguf_imatrix(f: BinaryIO, im: Imatrix) -> None:
    """Serialize ``im`` as a GGUF v3 imatrix into the binary file ``f``."""
    kvs = [
        _kv_str("general.type", "imatrix"),
        _kv_str_array("imatrix.datasets", im.datasets),
        _kv_u32("imatrix.chunk_count", im.chunk_count),
        _kv_u32("imatrix.chunk_size", im.chunk_size),
    ]
    tensors: list[tuple[str, np.ndarray]] = []
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat = e.counts.size
        tensors.append((f"{name}.in_sum2", e.sums.astype("<f4").reshape(n_mat, -1)))
        tensors.append((f"{name}.counts", e.counts.astype("<f4").reshape(n_mat, 1)))
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs)) + b"".join(kvs)
    infos = []
    offset = 0
    for name, arr in tensors:
        ne = list(reversed(arr.shape))  # ggml order: ne0 (fastest) first
        infos.append(
            _gguf_str(name)
            + struct.pack("<I", len(ne))
            + b"".join(struct.pack("<Q", d) for d in ne)
            + struct.pack("<IQ", _GGML_F32, offset)
        )
        offset += arr.nbytes + _pad(arr.nbytes)
    meta = head + b"".join(infos)
    f.write(meta + b"\0" * _pad(len(meta)))
    for _name, arr in tensors:
        data = np.ascontiguousarray(arr).tobytes()
        f.write(data + b"\0" * _pad(len(data)))


def write_legacy_imatrix(f: BinaryIO, im: Imatrix) -> None:
    """Serialize ``im`` in the legacy ``.dat`` layout (save_imatrix_legacy)."""
    names = sorted(im.entries)
    f.write(struct.pack("<i", len(names)))
    chunk = max(1, im.chunk_size)
    for name in names:
        e = im.entries[name]
        ncall = int((float(e.counts.max()) + chunk - 1) // chunk)
        vals = (e.importance * float(ncall)).astype("<f4").reshape(-1)
        b = name.encode()
        f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, vals.size))
        f.write(vals.tobytes())
    ds = (im.datasets[-1] if im.datasets else "").encode()
    f.write(struct.pack("<i", im.chunk_count) + struct.pack("<i", len(ds)) + ds)


def save_imatrix(path: Path | str, im: Imatrix) -> None:
    """Write ``im`` atomically: GGUF, or the legacy format when ``path`` ends in ``.dat``."""
    path = Path(path)
    with atomic_file(path) as f:
        if path.suffix == ".dat":
            write_legacy_imatrix(f, im)
        else:
            write_gguf_imatrix(f, im)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def load_imatrix(path: Path | str) -> Imatrix:
    """Read a GGUF or legacy ``.dat`` imatrix (from qtool or llama-imatrix)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInputError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return _load_gguf(path)
    return _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/struct errors
        raise CorruptFileError(f"{path}: corrupt GGUF imatrix ({e})") from e
    fields: dict[str, Any] = {k: _field_value(v) for k, v in r.fields.items()}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        data = np.array(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = data
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = data.reshape(-1)
    if not sums or set(sums) != set(counts):
        raise CorruptFileError(f"{path}: not an imatrix (needs matching .in_sum2/.counts tensors)")
    entries = {
        n: ImatrixEntry(sums=s.reshape(counts[n].size, -1), counts=counts[n])
        for n, s in sums.items()
    }
    ds = fields.get("imatrix.datasets") or []
    return Imatrix(
        entries,
        [str(d) for d in (ds if isinstance(ds, list) else [ds])],
        int(fields.get("imatrix.chunk_count") or 0),
        int(fields.get("imatrix.chunk_size") or 0),
    )


def _field_value(field: Any) -> Any:
    from gguf import GGUFValueType

    types = list(field.types)
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    part = field.parts[field.data[0]]
    if types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0] if hasattr(part, "tolist") else part


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptFileError(f"{path}: truncated legacy imatrix")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise CorruptFileError(f"{path}: not an imatrix (neither GGUF nor legacy .dat)")
    entries = {}
    for _ in range(n):
        (ln,) = take("<i")
        name = data[pos : pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).copy()
        pos += 4 * nval
        # (Σx²/count)·ncall with counts {ncall}: importance = vals / ncall, as quantize reads it
        entries[name] = ImatrixEntry(
            sums=vals.reshape(1, -1), counts=np.array([float(ncall)], dtype=np.float32)
        )
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            datasets = [data[pos : pos + ln].decode("utf-8", "replace")]
    return Imatrix(entries, datasets, int(chunks), 0)


def read_imatrix(path: Path | str) -> dict[str, np.ndarray]:
    """name (llama.cpp tensor name) -> float32 per-column importance, as llama-quantize
    derives it from the file (``ImatrixEntry.importance``)."""
    return {n: e.importance.reshape(-1) for n, e in load_imatrix(path).entries.items()}


def check_imatrix(
    imatrix: dict[str, np.ndarray], columns: dict[str, int], path: Path | str
) -> None:
    """Refuse an imatrix made for another model: names must be this model's and lengths match."""
    from qtool.errors import BadInputError

    known = [n for n in imatrix if n in columns]
    if not known:
        raise BadInputError(
            f"{path}: none of its {len(imatrix)} entries name a tensor of this model",
            hint="was it computed for another model? re-run `qtool calibrate` on this one",
        )
    for n in known:
        if imatrix[n].size % columns[n]:
            raise BadInputError(
                f"{path}: entry {n} has {imatrix[n].size} values but the tensor has "
                f"{columns[n]} columns",
                hint="the imatrix belongs to another model",
            )
