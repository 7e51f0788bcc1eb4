"""``qtool eval --resume FILE``: a SIGKILLed evaluation continues to exactly the numbers of an
uninterrupted one (PPL, every KLD statistic, top-1, Δp); Ctrl-C saves the last complete
window; a state file of other settings (or any other file) is refused and left as it was; a
completed run deletes it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qtool.evaluate.runner as runner
import qtool.evaluate.state as state
from qtool import interrupt

DATA = "canterbury:alice29.txt"
FAST = ("--dataset", DATA, "--ctx", "64", "--chunks", "6", "--threads", "1")
TIMING = {"forward_seconds", "tokens_per_second"}


def _numbers(d: dict) -> dict:
    """The report without its timings (everything else must be identical)."""
    d = json.loads(json.dumps(d))
    d = {k: v for k, v in d.items() if k != "timing"}
    d["base"] = {k: v for k, v in d["base"].items() if k not in TIMING}
    d["artifacts"] = [{k: v for k, v in a.items() if k not in TIMING} for a in d["artifacts"]]
    return d


def _windows_done(path: Path) -> int:
    with np.load(path, allow_pickle=False) as z:
        return int(json.loads(bytes(z["meta"]).decode())["windows_done"])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _one_line(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def args(tiny_base: Path, tiny_f16: Path, tiny_gguf_q8: Path) -> tuple:
    return (tiny_f16, tiny_gguf_q8, "--base", tiny_base, *FAST)


@pytest.fixture(scope="module")
def uninterrupted(args: tuple) -> dict:
    from qtool import api

    f16, q8, _, base, *_ = args
    data = api.evaluate(
        [str(f16), str(q8)], base=str(base), dataset=DATA, ctx=64, chunks=6, threads=1
    ).data
    return json.loads(json.dumps(data))  # as the CLI prints it


def _interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C inside the metrics at their ``call``-th call (two a window here: two artifacts,
    one slice each); only the save Ctrl-C makes."""
    real, seen = runner.update_compare, {"n": 0}

    def update(*a, **k):
        seen["n"] += 1
        if seen["n"] == call:  # as qtool's SIGINT handler does: the flag set, then raised
            interrupt._on_sigint(signal.SIGINT, None)
        return real(*a, **k)

    monkeypatch.setattr(runner, "update_compare", update)
    monkeypatch.setattr(interrupt, "_interrupted", False)  # cleared again by undo
    monkeypatch.setattr(state, "CHECKPOINT_SECONDS", 1e9)


# A qtool process that saves after every window and SIGKILLs itself in the metrics at their
# KILL-th call (two a window: the second artifact of window KILL / 2).
KILLED = """
import os, signal, sys
import qtool.evaluate.state as st
st.CHECKPOINT_SECONDS = 0
import qtool.evaluate.runner as r
real, seen = r.update_compare, [0]
def update(*a, **k):
    seen[0] += 1
    if seen[0] == int(os.environ["KILL"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
r.update_compare = update
from qtool.cli import main
main(sys.argv[1:])
"""


def _count_updates(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = runner.update_compare
    monkeypatch.setattr(runner, "update_compare", lambda *a: calls.append(1) or real(*a))
    return calls


def test_killed_eval_resumes_to_the_same_numbers(
    cli, args, uninterrupted, tmp_path, monkeypatch
) -> None:
    resume = tmp_path / "eval.state"
    root = str(Path(state.__file__).resolve().parents[2])  # this qtool, not an installed one
    env = {**os.environ, "KILL": str(2 * 3 + 2), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", KILLED, "-q", "eval", *map(str, args), "--resume", str(resume)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _windows_done(resume) == 3

    from qtool import api

    calls = _count_updates(monkeypatch)
    events: list[dict] = []
    f16, q8, _, base, *_ = args
    res = api.evaluate(
        [str(f16), str(q8)],
        base=str(base),
        dataset=DATA,
        ctx=64,
        chunks=6,
        threads=1,
        resume=resume,
        on_event=events.append,
    )
    assert any("resuming at window 4 of 6" in e.get("message", "") for e in events)
    assert len(calls) == 2 * 3  # windows 4 to 6 only
    assert _numbers(res.data) == _numbers(uninterrupted)  # bit for bit, KLD p99 included
    assert not resume.exists()


def test_ctrl_c_saves_the_last_window(cli, args, uninterrupted, tmp_path, monkeypatch) -> None:
    resume = tmp_path / "eval.state"
    _interrupt_at(monkeypatch, 2 * 3 + 2)  # the second artifact of the fourth window
    r = cli("eval", *args, "--resume", resume)
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "error: interrupted"
    assert _windows_done(resume) == 3 and "3 of 6 windows kept in" in r.stderr
    monkeypatch.undo()
    calls = _count_updates(monkeypatch)
    r = cli("eval", *args, "--resume", resume, "--json")
    assert r.exit_code == 0, r.stderr
    assert len(calls) == 2 * 3  # windows 4 to 6 only
    assert _numbers(r.json()) == _numbers(uninterrupted)
    assert not resume.exists()


def test_state_of_other_settings_refused(cli, args, tmp_path, monkeypatch) -> None:
    resume = tmp_path / "eval.state"
    _interrupt_at(monkeypatch, 5)
    assert cli("eval", *args, "--resume", resume).exit_code == 130
    monkeypatch.undo()
    before = _sha(resume)
    f16, q8, _, base, *_ = args
    other_ctx = ("--dataset", DATA, "--ctx", "32", "--chunks", "6", "--threads", "1")
    _one_line(
        cli("eval", f16, q8, "--base", base, *other_ctx, "--resume", resume),
        2,
        "another evaluation",
        "ctx: 64 -> 32",
    )
    _one_line(
        cli("eval", q8, f16, "--base", base, *FAST, "--resume", resume),
        2,
        "another evaluation",
        "artifacts",
    )
    _one_line(
        cli("eval", *args, "--dtype", "bfloat16", "--resume", resume),
        2,
        "another evaluation",
        "dtype",
    )
    assert _sha(resume) == before and sorted(tmp_path.iterdir()) == [resume]

    text = tmp_path / "notes.txt"
    text.write_text("not a state file")
    _one_line(cli("eval", *args, "--resume", text), 2, "not a qtool eval state file")
    assert text.read_text() == "not a state file"


def test_completed_run_leaves_no_state(cli, args, uninterrupted, tmp_path) -> None:
    resume = tmp_path / "eval.state"
    r = cli("eval", *args, "--resume", resume, "--json")
    assert r.exit_code == 0, r.stderr
    assert _numbers(r.json()) == _numbers(uninterrupted)
    assert list(tmp_path.iterdir()) == []
