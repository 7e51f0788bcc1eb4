"""Resuming an interrupted GGUF export (``qtool export --resume``, the GGUF outputs of
``qtool quantize``): a SIGKILLed run continues to the bytes of an uninterrupted one; another
run's checkpoint, or one changed behind the run's back, is refused and left as it was; a
completed run leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import qtool.formats.gguf as ge
from qtool import interrupt
from tests.export.helpers import build_tiny

TP = ("--tokenizer-pre", "smollm")  # the tiny model's cut tokenizer
ARGS = ("--outtype", "Q4_K_M", *TP)
N_TENSORS = 21  # the tiny Llama's GGUF: 2 layers x 9, embeddings, output norm, output


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("resume") / "model", "llama", assets.smollm2_hf)


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of an uninterrupted export."""
    from qtool import api

    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    api.export(str(tiny), type="Q4_K_M", tokenizer_pre="smollm", output=out)
    return out.read_bytes()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _state(out: Path) -> dict:
    return json.loads((ge.partial_path(out) / ge.STATE).read_text())


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir())}


def _one_line(r, code: int, *needles: str) -> str:
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Ctrl-C inside the encoder at its ``calls``-th call (one call a tensor here), as qtool's
    SIGINT handler delivers it: the interrupted flag set (cleared by ``monkeypatch.undo``)."""
    real, seen = ge.encode, {"n": 0}

    def encode(*a, **k):
        seen["n"] += 1
        if seen["n"] == calls:
            interrupt._on_sigint(signal.SIGINT, None)
        return real(*a, **k)

    monkeypatch.setattr(ge, "encode", encode)
    monkeypatch.setattr(interrupt, "_interrupted", False)
    monkeypatch.setattr(ge, "CHECKPOINT_BYTES", 1 << 40)  # only the checkpoint Ctrl-C writes


def _count_encodes(monkeypatch) -> list[str]:
    """The names of the tensors encoded from now on."""
    real, names = ge.encode, []

    def encode(x, qtype, imatrix, name):
        names.append(name)
        return real(x, qtype, imatrix, name)

    monkeypatch.setattr(ge, "encode", encode)
    return names


# A qtool process that checkpoints after every third tensor and SIGKILLs itself in the encoder
# at its KILL-th call: tensors past the last checkpoint are lost with the process.
KILLED = """
import os, signal, sys
import qtool.formats.gguf as g
def tensor_done(self, k):
    self.completed = k
    if k % 3 == 0:
        self.checkpoint(k)
g.PartialGGUF.tensor_done = tensor_done
real, seen = g.encode, [0]
def encode(*a, **k):
    seen[0] += 1
    if seen[0] == int(os.environ["KILL"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
g.encode = encode
from qtool.cli import main
main(sys.argv[1:])
"""


def _run_killed(out: Path, tiny: Path, kill_at: int) -> None:
    root = str(Path(ge.__file__).resolve().parents[2])  # this qtool, not an installed one
    env = {**os.environ, "KILL": str(kill_at), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", KILLED, "-q", "export", str(tiny), *ARGS, "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_killed_export_resumes_to_the_same_bytes(
    cli, tiny: Path, reference: bytes, tmp_path, monkeypatch
):
    out = tmp_path / "m.gguf"
    folder = ge.partial_path(out)
    _run_killed(out, tiny, kill_at=9)  # 8 tensors written, checkpoints after 3 and 6
    assert not out.exists()
    state = _state(out)
    assert state["tensors_done"] == 6 and state["tensors"] == N_TENSORS
    with open(folder / ge.DATA, "ab") as f:  # and a tensor cut short
        f.write(b"\xffhalf a tensor" * 1000)
    before = _snapshot(folder)

    # the same command without --resume: refused, the checkpoint untouched
    _one_line(cli("export", tiny, *ARGS, "-o", out), 2, "interrupted", "--resume", folder.name)
    # another run's options with --resume: refused, untouched
    _one_line(
        cli("export", tiny, "--outtype", "Q8_0", *TP, "-o", out, "--resume"),
        2,
        "another run",
        "Q4_K_M -> Q8_0",
    )
    assert not out.exists() and _snapshot(folder) == before

    names = _count_encodes(monkeypatch)
    r = cli("export", tiny, *ARGS, "-o", out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert f"resuming m.gguf: 6 of {N_TENSORS} tensors" in r.stderr
    # the last checkpointed tensor made again to check it, then the 15 after it: no more
    assert len(names) == 1 + N_TENSORS - 6 and len(set(names)) == len(names)
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no checkpoint left


def test_ctrl_c_without_resume_leaves_nothing(cli, tiny: Path, tmp_path, monkeypatch) -> None:
    _interrupt_after(monkeypatch, 6)
    r = cli("export", tiny, *ARGS, "-o", tmp_path / "m.gguf")
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "error: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_with_resume_keeps_a_checkpoint(
    cli, tiny: Path, reference: bytes, tmp_path, monkeypatch
) -> None:
    """With --resume, Ctrl-C checkpoints the tensors complete so far (nothing at the output
    path) and says so; the same command continues, and continues again when interrupted
    again; the API continues it; a completed run leaves no state."""
    from qtool import api

    out = tmp_path / "m.gguf"
    _interrupt_after(monkeypatch, 6)
    r = cli("export", tiny, *ARGS, "-o", out, "--resume")
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "error: interrupted"
    assert "5 of 21 tensors kept in" in r.stderr and "the same command continues" in r.stderr
    assert not out.exists() and _state(out)["tensors_done"] == 5
    monkeypatch.undo()
    _one_line(cli("export", tiny, *ARGS, "-o", out), 2, "interrupted", "--resume")
    _interrupt_after(monkeypatch, 8)  # the check of tensor 5, then tensors 6 to 11
    assert cli("export", tiny, *ARGS, "-o", out, "--resume").exit_code == 130
    assert not out.exists() and _state(out)["tensors_done"] == 11
    monkeypatch.undo()
    names = _count_encodes(monkeypatch)
    events: list[dict] = []
    api.export(
        str(tiny),
        type="Q4_K_M",
        tokenizer_pre="smollm",
        output=out,
        resume=True,
        on_event=events.append,
    )
    assert out.read_bytes() == reference
    assert len(names) == 1 + N_TENSORS - 11
    assert any("resuming m.gguf: 11 of 21" in e.get("message", "") for e in events)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_ctrl_c_in_the_first_tensor_leaves_nothing(cli, tiny: Path, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 1)
    r = cli("export", tiny, *ARGS, "-o", tmp_path / "m.gguf", "--resume")
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "error: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_changed_behind_the_runs_back_is_refused(
    cli, tiny: Path, tmp_path, monkeypatch
) -> None:
    """The last complete tensor is encoded again on resume and compared; a source file that
    changed (its modification time) is another run. Either way nothing is touched."""
    out = tmp_path / "m.gguf"
    folder = ge.partial_path(out)
    _interrupt_after(monkeypatch, 8)
    assert cli("export", tiny, *ARGS, "-o", out, "--resume").exit_code == 130
    monkeypatch.undo()
    state = _state(out)
    k = state["tensors_done"]
    assert k >= 5
    # flip one byte inside the last complete tensor (every tensor here is over 1 KiB)
    data = bytearray((folder / ge.DATA).read_bytes())
    data[state["offset"] - 200] ^= 0x55
    (folder / ge.DATA).write_bytes(bytes(data))
    before = _snapshot(folder)
    _one_line(cli("export", tiny, *ARGS, "-o", out, "--resume"), 2, "not what this run writes")
    assert _snapshot(folder) == before and not out.exists()

    src = tiny / "model.safetensors"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        _one_line(cli("export", tiny, *ARGS, "-o", out, "--resume"), 2, "another run", "mtime_ns")
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _snapshot(folder) == before and not out.exists()


def test_quantize_gguf_output_resumes(cli, tiny: Path, tmp_path, monkeypatch) -> None:
    """``qtool quantize`` without GPTQ continues with --resume OUT.qtool-partial (what its
    refusal names); any other --resume path is refused before any work."""
    ref = tmp_path / "ref.gguf"
    q = ("quantize", tiny, "--type", "Q3_K_M", *TP)
    assert cli(*q, "-o", ref).exit_code == 0
    out = tmp_path / "m.gguf"
    folder = ge.partial_path(out)
    _interrupt_after(monkeypatch, 7)
    r = cli(*q, "-o", out, "--resume", folder)
    assert r.exit_code == 130 and "6 of 21 tensors kept" in r.stderr
    monkeypatch.undo()
    _one_line(cli(*q, "-o", out), 2, "interrupted", f"--resume {folder}")
    _one_line(cli(*q, "-o", out, "--resume", tmp_path / "x"), 2, "no GPTQ stage", folder.name)
    r = cli(*q, "-o", out, "--resume", folder)
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "ref.gguf"]


def test_gptq_gguf_output_resumes(cli, tiny: Path, tmp_path, monkeypatch) -> None:
    """GPTQ on Q4_K_M's grids (the q projections, to be quick), interrupted while the GGUF is
    written: --resume with GPTQ's folder continues both (its layers all done, the file from its
    checkpoint) to the bytes of an uninterrupted run."""
    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps(
            {
                "calibration": {"dataset": "canterbury", "samples": 2, "seq_len": 32},
                "stages": [{"method": "gptq", "include": ["*.q_proj"]}],
                "outputs": [{"format": "gguf", "type": "Q4_K_M", "tokenizer_pre": "smollm"}],
            }
        )
    )
    q = ("quantize", tiny, "--recipe", recipe)
    ref = tmp_path / "ref" / "m.gguf"
    ref.parent.mkdir()
    assert cli(*q, "-o", ref).exit_code == 0
    out = tmp_path / "m.gguf"
    work = tmp_path / "m.gguf.qtool-gptq"
    _interrupt_after(monkeypatch, 6)  # the tensors GPTQ did not take go through the encoder
    assert cli(*q, "-o", out, "--resume", work).exit_code == 130
    monkeypatch.undo()
    assert work.is_dir() and _state(out)["tensors_done"] >= 5
    _one_line(cli(*q, "-o", out), 2, "interrupted", f"--resume {work}")
    r = cli(*q, "-o", out, "--resume", work)
    assert r.exit_code == 0, r.stderr
    assert "gptq" in cli(*q, "-o", tmp_path / "x.gguf", "--dry-run").stdout
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "r.json", "ref"]


def test_a_checkpoint_in_use_is_refused(cli, tiny: Path, tmp_path) -> None:
    """Two runs writing one output: the second is refused while the first holds the lock."""
    out = tmp_path / "m.gguf"
    folder = ge.partial_path(out)
    folder.mkdir()
    fd = ge._lock(folder)
    assert fd is not None and fd >= 0
    try:
        _one_line(cli("export", tiny, *ARGS, "-o", out, "--resume"), 2, "another qtool process")
    finally:
        ge._unlock(fd)
    assert not out.exists()
