"""Several processes on one run: ``torchrun --nproc-per-node N -m qtool ...`` (or ``--nproc N``).

Data-parallel calibration and weight-parallel GPTQ on ``torch.distributed`` (gloo for the CPU,
NCCL for CUDA tensors; one process group serves both, ``cpu:gloo,cuda:nccl``):

- **samples** are cut into at most :data:`GROUPS` groups of consecutive batches, of at least
  :data:`GROUP_TOKENS` tokens where there are enough (:func:`groups`); each rank runs the
  embedding pass and every layer's forwards on a contiguous
  run of whole groups (:func:`shard`). A batch's forward is the same computation on any rank, so
  the hidden states are the single-process run's, bit for bit.
- **statistics and Hessians** are summed exactly: each group's partial sum (the single-process
  accumulation, restarted at every group) is added into a float64 pair ``hi + lo`` with Knuth's
  TwoSum (:func:`qtool.observers.stats.fold`), and the ranks' pairs are all-gathered and folded
  the same way (:meth:`World.exact_sum_`). Every addition is then exact (see ``fold`` for the
  one condition), so the sum does not depend on how the groups were spread over the ranks and the
  result, rounded once, is the single-process run's bits. Counts and histograms are integers;
  minima and maxima are exact anyway.
- **GPTQ** solves a stage's linears on different ranks (:func:`assign`, by cost) with the same
  reduced Hessian; the results travel as safetensors bytes, never pickle, and every rank applies
  the same quantized weights before propagating its shard.
- **rank 0** alone prints, writes outputs and the resume directory; the others are silent.

A world of size 1 (no torchrun) makes every collective a no-op.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from qtool.errors import BadInputError, PeerError, QToolError
from qtool.observers.stats import merge
from qtool.runner.ranks import DIE_ENV, LAUNCHER_ENV, launched
from qtool.runner.ranks import rank as env_rank
from qtool.runner.ranks import world_size as env_world_size

T = TypeVar("T")

# Data-parallel granularity: the calibration batches form at most this many groups of
# consecutive batches, and each rank runs whole groups (so at most GROUPS ranks share the
# forwards). The exact sums fold once per group, which keeps their cost small next to the
# products they add up.
GROUPS = 32
# ...but a group holds at least GROUP_TOKENS tokens while that leaves MIN_GROUPS groups: a group's
# end flushes the Hessian accumulators' row buffers (2048 rows) and folds every sum, so groups
# of a single 512-token batch made thin products and a fold per batch (SmolLM2 GPTQ, 32 x 512
# tokens: 32 groups of 1 batch, now 8 of 4)
GROUP_TOKENS = 2048
MIN_GROUPS = 8
# An all-gather of float64 pairs moves at most this many elements per rank at once.
_CHUNK = 1 << 22
TIMEOUT_S = int(os.environ.get("QTOOL_DIST_TIMEOUT", "1800"))


# -- batches ---------------------------------------------------------------------------------


def groups(n_batches: int, batch_tokens: int = 0) -> list[range]:
    """The batches ``0..n-1`` in groups of consecutive batches (every group ``ceil(n / k)``
    batches, the last one shorter): ``k`` at most :data:`GROUPS`, and with ``batch_tokens``
    (tokens a batch) no more than make :data:`GROUP_TOKENS` tokens a group unless that left
    fewer than :data:`MIN_GROUPS`. A function of the batches alone, so every world size sums
    the same groups."""
    k = min(GROUPS, n_batches)
    if batch_tokens > 0:
        k = min(k, max(MIN_GROUPS, n_batches * batch_tokens // GROUP_TOKENS))
    size = max(1, -(-n_batches // max(1, k)))
    return [range(a, min(a + size, n_batches)) for a in range(0, n_batches, size)]


def shard(n_batches: int, rank: int, size: int, batch_tokens: int = 0) -> range:
    """Rank ``rank``'s batches: a contiguous run of whole groups, the groups spread evenly."""
    gs = groups(n_batches, batch_tokens)
    lo, hi = len(gs) * rank // size, len(gs) * (rank + 1) // size
    if lo >= hi:
        return range(0, 0)
    return range(gs[lo].start, gs[hi - 1].stop)


def group_ends(batches: range, n_batches: int, batch_tokens: int = 0) -> list[bool]:
    """For each batch of ``batches`` (a shard of ``n_batches``), whether it closes a group."""
    stops = {g.stop for g in groups(n_batches, batch_tokens)}
    return [j + 1 in stops for j in batches]


# -- the world -------------------------------------------------------------------------------


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    # -- helpers every collective goes through ---------------------------------------------

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except QToolError:
            raise
        except (RuntimeError, OSError, ValueError) as e:
            raise PeerError(
                f"another rank stopped while the ranks were exchanging {what} "
                f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
            ) from e

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place: ``sum`` (integers), ``max`` or ``min`` — all exact."""
        if self.active:
            ops = {
                "sum": torch.distributed.ReduceOp.SUM,
                "max": torch.distributed.ReduceOp.MAX,
                "min": torch.distributed.ReduceOp.MIN,
            }
            with self._collective("statistics"):
                torch.distributed.all_reduce(t, op=ops[op])
        return t

    def sum_int(self, n: int) -> int:
        if not self.active:
            return n
        return int(self.all_reduce_(torch.tensor([n], dtype=torch.int64), "sum")[0])

    def sum_ints(self, values: list[int]) -> list[int]:
        if not self.active:
            return values
        t = self.all_reduce_(torch.tensor(values, dtype=torch.int64), "sum")
        return [int(v) for v in t]

    def exact_sum_(self, hi: torch.Tensor, lo: torch.Tensor) -> None:
        """Replace every rank's pair ``hi + lo`` by the exact sum over the ranks (the same bits
        on every rank): the pairs are all-gathered (in chunks) and folded."""
        if not self.active:
            return
        fh, fl = hi.reshape(-1), lo.reshape(-1)
        for a in range(0, fh.numel(), _CHUNK):
            h, ll = fh[a : a + _CHUNK], fl[a : a + _CHUNK]
            both = torch.cat([h, ll])
            parts = [torch.empty_like(both) for _ in range(self.size)]
            with self._collective("Hessians and statistics"):
                torch.distributed.all_gather(parts, both)
            n = h.numel()
            h.zero_()
            ll.zero_()
            for p in parts:
                merge(h, ll, p[:n], p[n:])

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (CPU tensors: gloo)."""
        if not self.active:
            return [data]
        with self._collective("results"):
            n = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            torch.distributed.all_gather(sizes, n)
            top = max(int(s[0]) for s in sizes)
            buf = torch.zeros(max(1, top), dtype=torch.uint8)
            if data:
                buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            outs = [torch.empty_like(buf) for _ in range(self.size)]
            torch.distributed.all_gather(outs, buf)
        return [bytes(o[: int(s[0])].numpy().tobytes()) for o, s in zip(outs, sizes, strict=True)]

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        if not self.active:
            assert data is not None
            return data
        with self._collective("the resume state"):
            n = torch.tensor([len(data) if self.rank == src and data is not None else 0])
            torch.distributed.broadcast(n, src)
            buf = torch.zeros(max(1, int(n[0])), dtype=torch.uint8)
            if self.rank == src and data:
                buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            torch.distributed.broadcast(buf, src)
        return bytes(buf[: int(n[0])].numpy().tobytes())

    def send_bytes(self, data: bytes, dst: int) -> None:
        with self._collective("hidden states"):
            torch.distributed.send(torch.tensor([len(data)], dtype=torch.int64), dst)
            if data:
                torch.distributed.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst)

    def recv_bytes(self, src: int) -> bytes:
        with self._collective("hidden states"):
            n = torch.zeros(1, dtype=torch.int64)
            torch.distributed.recv(n, src)
            buf = torch.empty(int(n[0]), dtype=torch.uint8)
            if int(n[0]):
                torch.distributed.recv(buf, src)
        return bytes(buf.numpy().tobytes())

    def send_tensor(self, t: torch.Tensor, dst: int) -> None:
        t = t.detach().to("cpu").contiguous()
        head = json.dumps({"shape": list(t.shape), "dtype": str(t.dtype)}).encode()
        self.send_bytes(head, dst)
        self.send_bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes(), dst)

    def recv_tensor(self, src: int) -> torch.Tensor:
        head = json.loads(self.recv_bytes(src))
        dtype = getattr(torch, head["dtype"].removeprefix("torch."))
        data = bytearray(self.recv_bytes(src))
        return torch.frombuffer(data, dtype=dtype).reshape(head["shape"])

    # -- agreement, rank-0 work --------------------------------------------------------------

    def agree(self, parts: dict[str, Any]) -> None:
        """Every rank must have the same ``parts`` (label -> JSON-able value: recipe, model,
        data...); otherwise every rank raises the same one-line error naming the first part
        that differs and the first rank that differs from rank 0."""
        if not self.active:
            return
        digests = [
            hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).digest()
            for v in parts.values()
        ]
        everyone = self.all_gather_bytes(b"".join(digests))
        for k, label in enumerate(parts):
            mine = everyone[0][32 * k : 32 * (k + 1)]
            for r, d in enumerate(everyone):
                theirs = d[32 * k : 32 * (k + 1)]
                if theirs != mine:
                    raise BadInputError(
                        f"the ranks disagree on {label}: rank {r} has {theirs.hex()[:12]}…, "
                        f"rank 0 has {mine.hex()[:12]}… (sha256)",
                        hint="every rank must run the same command on the same files",
                    )

    def on_main(self, fn: Callable[[], T], share: Callable[[T], Any] | None = None) -> Any:
        """Run ``fn`` on rank 0 only. Its error, if any, is raised on every rank (one line,
        printed by rank 0); otherwise ``share(result)`` (JSON) is returned on every rank (rank
        0 gets ``fn``'s own result when ``share`` is None)."""
        if not self.active:
            return fn()
        result: Any = None
        payload: dict[str, Any]
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
                payload = {"ok": share(result) if share is not None else None}
            except QToolError as e:
                error = e
                payload = {
                    "error": type(e).__name__,
                    "bad_input": isinstance(e, BadInputError),
                    "message": e.message,
                    "hint": e.hint,
                }
            except BaseException as e:  # noqa: BLE001 - the others must not wait forever
                error = e
                payload = {"error": type(e).__name__, "bad_input": False, "message": str(e)}
        data = json.loads(
            self.broadcast_bytes(json.dumps(payload).encode() if self.is_main else None)
        )
        if error is not None:
            raise error
        if "error" in data:
            cls = BadInputError if data["bad_input"] else QToolError
            raise cls(f"rank 0: {data['message']}", hint=data.get("hint"))
        if self.is_main:
            return result
        return data["ok"]

    def shutdown(self) -> None:
        if self.active and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - at exit, after a failure
                pass


_WORLD: World | None = None


def world() -> World:
    """The process's world: from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), initialized on first use; size 1 when not
    launched by torchrun."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = env_world_size()
    if size <= 1:
        _WORLD = World()
        return _WORLD
    if not torch.distributed.is_available():
        raise QToolError("this torch build has no torch.distributed: run without torchrun")
    rank = env_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    try:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                timeout=datetime.timedelta(seconds=TIMEOUT_S),
            )
    except (RuntimeError, ValueError) as e:
        raise QToolError(
            f"rank {rank}: cannot join the torch.distributed world of {size} "
            f"({str(e).splitlines()[0][:160]})",
            hint="check MASTER_ADDR/MASTER_PORT and that every rank was started",
        ) from e
    _WORLD = World(rank=rank, size=size, local_rank=local)
    return _WORLD


def local_cuda(device: torch.device) -> torch.device:
    """Under torchrun, plain ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and launched():
        n = max(1, torch.cuda.device_count())
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % n)
    return device


def software() -> dict[str, Any]:
    """What every rank must run alike for the same bits: qtool and torch."""
    from qtool import __version__

    return {"the qtool and torch versions": [__version__, torch.__version__]}


def note_resume(path: Any) -> None:
    """Remember the resume directory (for the one-line error of a failed distributed run); the
    ``--nproc`` launcher reads it from its folder."""
    folder = os.environ.get(LAUNCHER_ENV)
    if folder and env_rank() == 0 and os.path.isdir(folder):
        with open(os.path.join(folder, "resume"), "w") as f:
            f.write(str(path))


def assign(costs: list[float], size: int) -> list[int]:
    """Jobs to ranks: the longest job first to the least-loaded rank (ties: the lower rank,
    then the earlier job) — deterministic, the same on every rank."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += costs[k]
    return owner


def die_here(layer: int) -> None:
    """Tests: ``QTOOL_TEST_DIE=RANK:LAYER`` kills that rank (SIGKILL) as it starts that layer."""
    spec = os.environ.get(DIE_ENV)
    if spec and spec == f"{env_rank()}:{layer}":
        os.kill(os.getpid(), signal.SIGKILL)
