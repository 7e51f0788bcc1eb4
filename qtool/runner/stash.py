"""Per-batch tensors kept where the memory plan puts them: the compute device, host memory, or
a file on disk.

The layer runner keeps one tensor per calibration batch for the hidden states between layers,
and GPTQ's passes keep a few more (the input of a linear whose module output it will recompute,
the output of a finished attention block). At 70B with 128 x 2048 tokens each kind is several
GB: with a memory budget they go to host memory (pinned, for a GPU) or to disk, one file per
batch, read back batch by batch with ``pread`` into a fresh buffer (not memory-mapped: mapped
pages stay resident once touched, and the point is to keep the process's memory bounded).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from qtool.errors import CorruptFileError, OutputError

PLACES = ("device", "host", "disk")


class Stash:
    """A list of tensors (one per batch) on ``device``, in host memory, or on disk."""

    def __init__(
        self,
        place: str,
        device: torch.device,
        *,
        folder: Path | None = None,
        name: str = "stash",
    ) -> None:
        if place not in PLACES:
            raise ValueError(f"place {place!r}: one of {PLACES}")
        self.place = place
        self.device = device
        self.name = name
        self._mem: list[torch.Tensor] = []
        self._meta: list[tuple[tuple[int, ...], torch.dtype]] = []
        self._dir: Path | None = None
        self._owned = False
        if place == "disk":
            if folder is None:
                self._dir = Path(tempfile.mkdtemp(prefix=f"qtool-{name}-"))
                self._owned = True
            else:
                self._dir = folder / name
                self._dir.mkdir(parents=True, exist_ok=True)

    # -- list-like -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._meta)

    def append(self, t: torch.Tensor) -> None:
        self._put(len(self._meta), t)

    def __setitem__(self, j: int, t: torch.Tensor) -> None:
        if j == len(self._meta):
            self.append(t)
        else:
            self._put(j, t)

    def __getitem__(self, j: int) -> torch.Tensor:
        """Batch ``j`` on the compute device."""
        shape, dtype = self._meta[j]
        if self.place == "disk":
            return self._read(j, shape, dtype).to(self.device)
        return self._mem[j].to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for j in range(len(self)):
            yield self[j]

    @property
    def nbytes(self) -> int:
        return sum(int(torch.tensor([], dtype=d).element_size()) * _numel(s) for s, d in self._meta)

    def clear(self) -> None:
        self._mem.clear()
        self._meta.clear()
        if self._dir is not None:
            for f in self._dir.glob("*.bin"):
                f.unlink(missing_ok=True)

    def close(self) -> None:
        self.clear()
        if self._dir is not None and self._owned:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:  # a stash on disk leaves nothing behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- storage ---------------------------------------------------------------------------------

    def _put(self, j: int, t: torch.Tensor) -> None:
        t = t.detach()
        meta = (tuple(t.shape), t.dtype)
        if j == len(self._meta):
            self._meta.append(meta)
        else:
            self._meta[j] = meta
        if self.place == "device":
            value = t.to(self.device)
        elif self.place == "host":
            value = t.to("cpu")
            if self.device.type == "cuda":
                value = value.pin_memory()
        else:
            self._write(j, t)
            return
        if j == len(self._mem):
            self._mem.append(value)
        else:
            self._mem[j] = value

    def _path(self, j: int) -> Path:
        assert self._dir is not None
        return self._dir / f"{j:06d}.bin"

    def _write(self, j: int, t: torch.Tensor) -> None:
        data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        path = self._path(j)
        try:
            with open(path, "wb") as f:
                f.write(data.data)
        except OSError as e:
            raise OutputError(
                f"{path}: cannot write the offloaded activations ({e.strerror})",
                hint="free disk space or raise --max-memory",
            ) from e

    def _read(self, j: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = _numel(shape) * int(torch.tensor([], dtype=dtype).element_size())
        buf = bytearray(n)
        view = memoryview(buf)
        with open(self._path(j), "rb", buffering=0) as f:
            done = 0
            while done < n:
                k = os.preadv(f.fileno(), [view[done:]], done)
                if k == 0:
                    raise CorruptFileError(f"{self._path(j)}: offloaded activations truncated")
                done += k
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
