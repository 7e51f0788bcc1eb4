"""Read an importance matrix the way llama-quantize does (tools/quantize/quantize.cpp).

GGUF format (llama-imatrix's current output): per tensor ``NAME.in_sum2`` (sum of squared
activations per input column) and ``NAME.counts`` (tokens seen); the importance of a column is
``in_sum2 / count`` in float32, or 1 where nothing was seen. The legacy ``.dat`` format stores
sums already divided by the call count and multiplied by it again: divided by ``ncall`` here.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from qtool.errors import BadInputError, CorruptFileError


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """name (llama.cpp tensor name) -> float32 per-column importance."""
    if not path.is_file():
        raise BadInputError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise CorruptFileError(f"{path}: corrupt imatrix GGUF ({exc})") from exc
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = data.reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = data.reshape(-1)
    if not sums:
        raise CorruptFileError(f"{path}: not an imatrix file (no *.in_sum2 tensors)")
    out: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None:
            raise CorruptFileError(f"{path}: {name}.in_sum2 has no {name}.counts")
        per = s.reshape(len(c), -1)
        weights = np.ones_like(per)
        seen = c > 0
        weights[seen] = per[seen] / c[seen, None].astype(np.float32)
        out[name] = weights.reshape(-1).astype(np.float32)
    return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    out: dict[str, np.ndarray] = {}
    try:
        (n,) = struct.unpack_from("<i", data, 0)
        pos = 4
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, pos)
            name = data[pos + 4 : pos + 4 + ln].decode()
            pos += 4 + ln
            ncall, nval = struct.unpack_from("<ii", data, pos)
            pos += 8
            sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            out[name] = (sums / np.float32(ncall)) if ncall > 0 else sums.copy()
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: corrupt legacy imatrix file ({e})") from e
    return out


def check_imatrix(imatrix: dict[str, np.ndarray], columns: dict[str, int], path: Path) -> None:
    """Refuse an imatrix made for another model: names must be this model's and lengths match."""
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
