"""torch.distributed runs (``--nproc N`` / torchrun): the same bytes as one process, ranks that
disagree refused, a rank that dies stopping the run with one line and a resumable folder.

The sums behind that identity are checked first without processes: a Hessian or a channel sum
split over "ranks" any way equals the one-process sum bit for bit (where plain float32 addition
does not), and the histogram does not depend on the order its values come in."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qtool.observers.stats import HessianAccumulator, InputAccumulator, StatsCollector, merge
from qtool.runner.dist import GROUPS, assign, group_ends, groups, shard
from tests.conftest import make_tiny_llama, with_tokenizer

REPO = Path(__file__).resolve().parents[2]


# -- batches and jobs -------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [0, 64, 512, 2048])
@pytest.mark.parametrize("n", [1, 5, 32, 33, 128, 1000])
def test_groups_and_shards_cover_every_batch_once(n: int, tokens: int) -> None:
    gs = groups(n, tokens)
    assert len(gs) <= GROUPS and [j for g in gs for j in g] == list(range(n))
    for size in range(1, min(len(gs), 5) + 1):
        shards = [shard(n, r, size, tokens) for r in range(size)]
        assert [j for s in shards for j in s] == list(range(n))
        starts = {g.start for g in gs}
        assert all(s.start in starts for s in shards if len(s))  # whole groups only
        ends = [e for s in shards for e in group_ends(s, n, tokens)]
        assert ends == [j + 1 in {g.stop for g in gs} for j in range(n)]


@pytest.mark.parametrize(
    "n,tokens,sizes",
    [
        (32, 512, [4] * 8),  # SmolLM2's 32 x 512: 8 groups of 2048 tokens, not 32 of 512
        (128, 512, [4] * 32),  # at most 32 groups
        (64, 512, [4] * 16),
        (16, 64, [2] * 8),  # few tokens: still 8 groups (ranks need groups)
        (6, 64, [1] * 6),  # fewer batches than that: one each
        (10, 2048, [1] * 10),  # a batch of 2048 tokens is a group
        (40, 0, [2] * 20),  # tokens unknown: 32 groups at most, as before
    ],
)
def test_groups_hold_2048_tokens_while_8_remain(n: int, tokens: int, sizes: list[int]) -> None:
    assert [len(g) for g in groups(n, tokens)] == sizes


def test_assign_balances_and_is_deterministic() -> None:
    costs = [9.0, 1.0, 1.0, 4.0, 4.0, 1.0]
    owner = assign(costs, 2)
    assert owner == assign(costs, 2)
    load = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert sorted(load) == [10.0, 10.0]
    assert assign(costs, 1) == [0] * len(costs)


# -- exact sums -------------------------------------------------------------------------------


def _batches(n: int = 12, rows: int = 64, cols: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # magnitudes spread over many orders, so float32 additions round
    return [
        torch.randn(rows, cols, generator=g) * (10.0 ** (k % 5 - 2)) + (k % 3) for k in range(n)
    ]


def _accumulate(batches: list[torch.Tensor], js: range, n: int) -> HessianAccumulator:
    acc = HessianAccumulator(batches[0].shape[1], torch.device("cpu"))
    for j, end in zip(js, group_ends(js, n), strict=True):
        acc.add(batches[j])
        if end:
            acc.end_group()
    return acc


@pytest.mark.parametrize("size", [2, 3, 5])
def test_hessian_split_over_ranks_is_bitwise_the_single_sum(size: int) -> None:
    xs = _batches()
    n = len(xs)
    one = _accumulate(xs, range(n), n).xtx()
    parts = [_accumulate(xs, shard(n, r, size), n) for r in range(size)]
    total = HessianAccumulator(one.shape[0], torch.device("cpu"))
    total.end_group()  # an empty pair, the ranks' pairs merged into it
    assert total.hi is not None and total.lo is not None
    for p in reversed(parts):  # the order of the ranks does not matter either
        p.end_group()
        assert p.hi is not None and p.lo is not None
        merge(total.hi, total.lo, p.hi, p.lo)
    assert torch.equal(total.xtx(), one)
    # what the exact sums avoid: float32 partial sums added per rank round differently
    plain = [sum((x.T @ x for x in (xs[j] for j in shard(n, r, size))), torch.zeros(48, 48))
             for r in range(size)]  # fmt: skip
    seq = sum((x.T @ x for x in xs), torch.zeros(48, 48))
    assert not torch.equal(sum(plain, torch.zeros(48, 48)), seq)


def test_histogram_does_not_depend_on_the_order() -> None:
    """A value equal to the range (a power of two) and a later doubling: counted where the
    final range puts it, whatever came first."""
    vals = [torch.tensor([[1.0, 0.25]]), torch.tensor([[3.0, 0.5]])]

    def hist(order: list[int]) -> Any:
        acc = InputAccumulator(2, torch.device("cpu"), bins=8, hessian=False)
        for k in order:
            acc.update(vals[k])
        return acc.result("x").hist

    assert (hist([0, 1]) == hist([1, 0])).all()


class _ThreadWorld:
    """A world of ``size`` threads, for unit tests of the reductions (same interface as
    :class:`qtool.runner.dist.World`, gathering through shared memory)."""

    def __init__(self, rank: int, size: int, shared: dict[str, Any]) -> None:
        self.rank, self.size, self.shared = rank, size, shared
        self.active = True
        self.is_main = rank == 0

    def _gather(self, value: Any) -> list[Any]:
        s = self.shared
        with s["lock"]:
            s["slots"][self.rank] = value
        s["barrier"].wait()
        out = list(s["slots"])
        s["barrier"].wait()
        return out

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return self._gather(data)

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        parts = self._gather(t.clone())
        f = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op]
        acc = parts[0]
        for p in parts[1:]:
            acc = f(acc, p)
        t.copy_(acc)
        return t

    def sum_int(self, n: int) -> int:
        return sum(self._gather(n))

    def exact_sum_(self, hi: torch.Tensor, lo: torch.Tensor) -> None:
        parts = self._gather((hi.clone(), lo.clone()))
        hi.zero_()
        lo.zero_()
        for h, ll in parts:
            merge(hi, lo, h, ll)


def test_stats_reduce_equals_one_process() -> None:
    """Calibration statistics (sums, counts, extremes, histograms, Hessians; a linear one rank
    never saw, as an MoE expert without tokens) combined over 3 ranks: the single run's bits."""
    xs = _batches(n=9)
    n = len(xs)
    lin_a, lin_b = torch.nn.Linear(48, 8), torch.nn.Linear(48, 4)

    def run(js: range, world: Any = None) -> dict[str, Any]:
        col = StatsCollector(torch.device("cpu"), hessian=True)
        for j, end in zip(js, group_ends(js, n), strict=True):
            col.observe_input("a", xs[j], 48)
            col.observe_output("a", lin_a(xs[j]).detach(), 8)
            if j in (0, 8):  # "b" sees only some batches: rank 1 of 3 never does
                col.observe_input("b", xs[j] * 3, 48)
                col.observe_output("b", lin_b(xs[j]).detach(), 4)
            col.end_batch(end)
        if world is not None:
            col.reduce(world)
        return col.detach()

    one = run(range(n))
    shared = {"lock": threading.Lock(), "barrier": threading.Barrier(3), "slots": [None] * 3}
    got: dict[int, Any] = {}

    def rank(r: int) -> None:
        got[r] = run(shard(n, r, 3), _ThreadWorld(r, 3, shared))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not {0, 8} & set(shard(n, 1, 3))  # rank 1 never saw "b"
    for r in range(3):
        for name in ("a", "b"):
            s, o = got[r][name], one[name]
            assert s.count == o.count
            for f in ("sum_sq", "absmax", "min", "max", "hist", "hessian", "out_absmax"):
                assert (getattr(s, f) == getattr(o, f)).all(), (r, name, f)
            assert (s.hist_range, s.out_min, s.out_max) == (o.hist_range, o.out_min, o.out_max)


# -- whole runs in several processes -----------------------------------------------------------


@pytest.fixture(scope="module")
def tok2(tmp_path_factory: pytest.TempPathFactory, assets) -> Path:
    """A float32 2-layer tiny Llama with SmolLM2's tokenizer."""
    path = make_tiny_llama(tmp_path_factory.mktemp("dist") / "tok2", dtype="float32",
                           vocab_size=49152)  # fmt: skip
    return with_tokenizer(path, assets)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _qtool(*args: object, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qtool", *map(str, args)],
        env=_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


GPTQ = ("--method", "gptq", "--bits", "4", "-g", "64", "-d", "canterbury", "-n", "6", "-L", "48")
CALIB = ("-d", "canterbury", "-n", "6", "-L", "48", "--hessian")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _in_process(*args: object) -> None:
    """``qtool ARGS`` in this process, with torch's threads as they are here (2 on the CI
    machine; each worker of ``--nproc 2`` has 1): the identity does not depend on them."""
    from qtool.cli.app import main

    try:
        main(list(map(str, args)))
    except SystemExit as e:
        assert e.code in (0, None)


@pytest.fixture(scope="module")
def one_process(tok2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "w4"
    _in_process("quantize", tok2, *GPTQ, "-o", out, "-q")
    return out


def test_gptq_two_processes_same_bytes_as_one(tok2: Path, one_process: Path, tmp_path: Path):
    out = tmp_path / "w4"
    r = _qtool("quantize", tok2, *GPTQ, "-o", out, "--nproc", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # rank 0 alone prints: one JSON document
    assert d["processes"] == 2
    assert _sha(out / "model.safetensors") == _sha(one_process / "model.safetensors")
    assert not (tmp_path / "w4.qtool-gptq").exists()


def test_calibrate_two_processes_same_bytes_as_one(tok2: Path, tmp_path: Path) -> None:
    _in_process("calibrate", tok2, *CALIB, "-o", tmp_path / "1.safetensors",
                "--imatrix", tmp_path / "1.gguf", "-q")  # fmt: skip
    r2 = _qtool("calibrate", tok2, *CALIB, "-o", tmp_path / "2.safetensors",
                "--imatrix", tmp_path / "2.gguf", "--nproc", "2", "--json")  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["processes"] == 2
    assert _sha(tmp_path / "1.safetensors") == _sha(tmp_path / "2.safetensors")
    assert _sha(tmp_path / "1.gguf") == _sha(tmp_path / "2.gguf")


def test_rank_that_dies_stops_the_run_and_resume_finishes_it(
    tok2: Path, one_process: Path, tmp_path: Path
) -> None:
    out, work = tmp_path / "w4", tmp_path / "w4.qtool-gptq"
    r = _qtool("quantize", tok2, *GPTQ, "-o", out, "--nproc", "2", QTOOL_TEST_DIE="1:1")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert lines == [
        "error: rank 1 of the --nproc run died (killed by SIGKILL); the other ranks were "
        f"stopped (rerun with --resume {work} to continue)"
    ], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".w4*"))  # nothing half-written
    assert json.loads((work / "state.json").read_text())["layers_done"] == 1
    r = _qtool("quantize", tok2, *GPTQ, "-o", out, "--nproc", "2", "--resume", work)
    assert r.returncode == 0, r.stderr
    assert "resuming at layer 1" in r.stderr
    assert _sha(out / "model.safetensors") == _sha(one_process / "model.safetensors")


def test_ranks_that_disagree_are_refused(tok2: Path, tmp_path: Path) -> None:
    """Two "nodes" started by hand with torchrun's variables, each in its own folder whose
    data.txt differs: the same command line, different calibration data."""
    for k, seed in ((0, "alpha beta"), (1, "gamma delta")):
        (tmp_path / f"n{k}").mkdir()
        (tmp_path / f"n{k}" / "data.txt").write_text(" ".join([seed] * 400))
    port = str(29500 + os.getpid() % 1000)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qtool",
                "quantize",
                str(tok2),
                *GPTQ[:6],
                "-d",
                "data.txt",
                "-n",
                "4",
                "-L",
                "32",
                "-o",
                str(tmp_path / "out"),
            ],  # fmt: skip
            cwd=tmp_path / f"n{r}",
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    res = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    err0 = [ln for ln in res[0][1].splitlines() if ln.startswith("error")]
    assert len(err0) == 1 and "the ranks disagree on the calibration data" in err0[0]
    assert res[1] == ("", "")  # rank 1 is silent
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.qtool-gptq").exists()


def test_nproc_and_other_commands_refused_inside_torchrun(cli, tok2: Path, monkeypatch) -> None:
    import signal

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    old = signal.getsignal(signal.SIGTERM)
    try:
        r = cli("calibrate", tok2, "--nproc", "2")
        r2 = cli("export", tok2, "--outtype", "F16", "-o", tok2.parent / "x.gguf")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert r.exit_code == 2 and "--nproc inside torchrun" in r.stderr
    assert r2.exit_code == 2 and "export does not run as several processes" in r2.stderr


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_gptq_two_gpus_nccl_same_bytes_as_one(tok2: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _qtool("quantize", tok2, *GPTQ, "--device", "cuda", "-o", one)
    r2 = _qtool("quantize", tok2, *GPTQ, "--device", "cuda", "-o", two, "--nproc", "2")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert _sha(one / "model.safetensors") == _sha(two / "model.safetensors")
