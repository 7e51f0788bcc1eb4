"""``qtool eval --resume FILE``: the evaluation's accumulators after the windows done.

A run given ``--resume FILE`` saves, after a window (at most every ``CHECKPOINT_SECONDS``, and
when it is interrupted by Ctrl-C or an error), how many windows are done and every metric
accumulator exactly: the base's and each artifact's float64 sums of NLL and NLL², top-1 and
token counts, the Δp sum, and every scored token's KL divergence (float64). A later run with
the same ``--resume FILE`` and the same settings skips those windows and accumulates the rest
in the same order, so PPL, KLD (mean, median, p99, max) and top-1 are bit for bit those of an
uninterrupted run. The file names the evaluation (artifacts, base and their files, the text
and its windows, ctx, chunks, scoring, backend, dtype, device, threads, versions); a file of
another evaluation is refused. A completed run deletes it.

The file is an ``.npz`` (numpy's zip of arrays, read without pickle): ``meta`` (JSON as bytes)
and ``kld_<i>`` per artifact, written to a temporary name, synced and renamed.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import BadInputError, CorruptFileError
from qtool.evaluate.metrics import CompareStats, PerplexityStats
from qtool.io import atomic_file, check_writable, first_difference, fsync_dir

STATE_VERSION = 1
# A save after a window once this long has passed since the last one (the KLD arrays grow with
# the text, so saving after every window of a fast run would rewrite them needlessly).
CHECKPOINT_SECONDS = 10.0


class EvalCheckpoint:
    """The resume file of one evaluation: what it holds (``windows_done``, :meth:`restore`)
    and the saves (:meth:`mark` after each window, :meth:`save`)."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = path
        self.identity = identity
        self.windows_done = 0  # in the file
        self._meta: dict[str, Any] | None = None
        self._kld: list[np.ndarray] = []
        self._mark: dict[str, Any] | None = None
        self._stats: list[CompareStats] = []
        self._last = time.monotonic()

    @classmethod
    def open(cls, path: Path | str, identity: dict[str, Any]) -> EvalCheckpoint:
        """The resume file at ``path``: continued when it holds this evaluation, empty when it
        does not exist; another evaluation's (or any other file) is refused, untouched."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise BadInputError(f"--resume {path}: is a folder; give a file name")
        check_writable(path)
        ck = cls(path, identity)
        if not path.exists():
            return ck
        meta, kld = _load(path)
        diff = first_difference(meta.get("identity"), identity)
        if diff:
            raise BadInputError(
                f"--resume {path}: the state of another evaluation "
                f"(windows done: {meta.get('windows_done', 0)}; differs in {diff})",
                hint="rerun with that evaluation's settings, or give a new file",
            )
        n = len(meta["artifacts"])
        if len(kld) != n or n != len(identity.get("artifacts", [])):
            raise CorruptFileError(
                f"--resume {path}: inconsistent state ({len(kld)} KLD arrays, {n} artifacts)",
                hint="delete it to start over",
            )
        ck._meta, ck._kld = meta, kld
        ck.windows_done = int(meta["windows_done"])
        return ck

    def restore(self) -> tuple[PerplexityStats, list[CompareStats], list[float], float]:
        """(base perplexity, each artifact's statistics, each distinct model's forward seconds,
        eval seconds) after ``windows_done`` windows."""
        assert self._meta is not None
        m = self._meta
        stats = [
            CompareStats.from_state(a, k) for a, k in zip(m["artifacts"], self._kld, strict=True)
        ]
        return (
            PerplexityStats.from_state(m["base"]),
            stats,
            [float(t) for t in m["forward_seconds"]],
            float(m["eval_seconds"]),
        )

    def mark(
        self,
        windows_done: int,
        base: PerplexityStats,
        stats: list[CompareStats],
        forward_seconds: list[float],
        eval_seconds: float,
    ) -> None:
        """The accumulators after ``windows_done`` complete windows (scalars copied, KLD slices
        counted), saved now when ``CHECKPOINT_SECONDS`` have passed since the last save."""
        self._stats = stats
        self._mark = {
            "windows_done": windows_done,
            "base": base.to_state(),
            "artifacts": [st.to_state(parts=0)[0] for st in stats],
            "kld_parts": [len(st.kld_parts) for st in stats],
            "forward_seconds": list(forward_seconds),
            "eval_seconds": eval_seconds,
        }
        if time.monotonic() - self._last >= CHECKPOINT_SECONDS:
            self.save()

    def save(self) -> None:
        """Write the last mark (a window boundary, whatever happened since)."""
        if self._mark is None:
            return
        mark = dict(self._mark)
        parts = mark.pop("kld_parts")
        arrays = {
            f"kld_{i}": st.to_state(parts=n)[1]
            for i, (st, n) in enumerate(zip(self._stats, parts, strict=True))
        }
        meta = {"qtool_eval_state": STATE_VERSION, "identity": self.identity, **mark}
        blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        savez: Any = np.savez  # (file, **arrays); its stub types the keywords as options
        with atomic_file(self.path, checkpoint=True) as f:
            savez(f, meta=blob, **arrays)
        fsync_dir(self.path.resolve().parent)
        self._last = time.monotonic()
        self.windows_done = int(mark["windows_done"])

    def remove(self) -> None:
        """The evaluation is complete: nothing to resume any more."""
        self.path.unlink(missing_ok=True)


def _load(path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    not_state = BadInputError(
        f"--resume {path}: not a qtool eval state file",
        hint="give a new file name (it is created), or the file an interrupted eval left",
    )
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise not_state
        with z:
            if "meta" not in z.files:
                raise not_state
            meta = json.loads(bytes(z["meta"]).decode())
            kld = [np.asarray(z[f"kld_{i}"], dtype=np.float64) for i in range(_count(z.files))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise not_state from e
    if not isinstance(meta, dict) or meta.get("qtool_eval_state") != STATE_VERSION:
        raise not_state
    return meta, kld


def _count(files: list[str]) -> int:
    return sum(1 for f in files if f.startswith("kld_"))
