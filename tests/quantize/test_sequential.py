"""The layer-by-layer GPTQ driver: input groups, the frozen-output cache (exact), GPTQ below RTN
on every linear, and resume after a kill giving the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtool.checkpoint import open_checkpoint
from qtool.grids.affine import QuantScheme
from qtool.runner.sequential import (
    SequentialOptions,
    WorkDir,
    discover,
    gptq_model,
    run_identity,
)
from qtool.runner.workdir import STATE
from tests.conftest import make_tiny_llama, run_killed_after_layers, with_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("seq") / "tiny32", dtype="float32", num_hidden_layers=3
    )


@pytest.fixture(scope="module")
def deep_tok(tmp_path_factory: pytest.TempPathFactory, assets) -> Path:
    """8 layers, SmolLM2's tokenizer: slow enough per layer to be killed in the middle."""
    path = make_tiny_llama(
        tmp_path_factory.mktemp("deep") / "deep", num_hidden_layers=8, vocab_size=49152
    )
    return with_tokenizer(path, assets)


def _ids(n: int = 6, seq: int = 64) -> torch.Tensor:
    return torch.randint(0, 1024, (n, seq), generator=torch.Generator().manual_seed(0))


def _grids(ckpt, scheme: QuantScheme) -> dict[str, list[QuantScheme]]:
    """Every decoder linear on ``scheme`` (the family's predicate)."""
    from qtool.models import family_for

    fam = family_for(ckpt.config)
    return {
        n.removesuffix(".weight"): [scheme]
        for n, t in ckpt.tensors.items()
        if fam.is_linear(n, tuple(t.shape))
    }


def _run(src: Path, work: Path, **kw: object):
    ckpt = open_checkpoint(str(src))
    opts = SequentialOptions(**kw)  # type: ignore[arg-type]
    grids = _grids(ckpt, QuantScheme(4, group_size=64))
    ids = _ids()
    wd = WorkDir.open(work, run_identity(ckpt, ids, opts, grids), resume=False)
    res = gptq_model(ckpt, ids, grids, opts, wd)
    return res, {k[0]: f() for k, f in res.weights.items()}


def test_llama_input_groups(tiny32: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny32)
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = _ids(1, 16)
    h = model.model.embed_tokens(ids)
    pos = torch.arange(16)[None]
    emb = model.model.rotary_emb(h, pos)
    plan = discover(layer, linears, lambda: layer(h, position_embeddings=emb))
    assert plan.tails == {"self_attn": ("self_attn.o_proj", 2), "mlp": ("mlp.down_proj", None)}
    assert plan.groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_output_cache_is_exact(tiny32: Path, tmp_path: Path, true_sequential: bool) -> None:
    """Reusing frozen modules' outputs instead of recomputing them changes no bit."""
    _, cached = _run(tiny32, tmp_path / "a", true_sequential=true_sequential)
    _, plain = _run(tiny32, tmp_path / "b", true_sequential=true_sequential, cache_outputs=False)
    assert cached.keys() == plain.keys() and len(cached) == 21
    for k in cached:
        assert torch.equal(cached[k].codes, plain[k].codes), k
        assert torch.equal(cached[k].scale, plain[k].scale), k


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_skipped_norms_change_no_bit(arch: str, assets, tmp_path: Path, monkeypatch) -> None:
    """A norm whose readers (the family's norm -> linears pairs) all replay their outputs is not
    computed: each pre-norm runs in the two passes that need it (collecting its linears' inputs,
    then the next group's) instead of in every pass, and the codes equal those of the run that
    replays and skips nothing. Fails if a norm were skipped while something still read it."""
    from qtool.models import family_for
    from qtool.runner import sequential
    from tests.export.helpers import build_tiny

    src = build_tiny(tmp_path / arch, arch, assets.smollm2_hf)
    ckpt = open_checkpoint(str(src))
    norms = {n for n, _ in family_for(ckpt.config).smooth_pairs}
    calls: dict[str, int] = {}
    seen: dict[int, str] = {}
    real_init = sequential._LayerPasses.__init__

    def init(self, layer, *a, **k):  # name the norm modules of each layer as it is built
        real_init(self, layer, *a, **k)
        seen.clear()  # one layer's passes at a time
        seen.update({id(m): n for n, m in layer.named_modules() if n in norms})

    monkeypatch.setattr(sequential._LayerPasses, "__init__", init)

    def hook(module: torch.nn.Module, _a: object, _y: object) -> None:
        name = seen.get(id(module))  # a replaced forward (an instance attribute) computes nothing
        if name is not None and "forward" not in vars(module):
            calls[name] = calls.get(name, 0) + 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        _, cached = _run(src, tmp_path / "a")
        n_cached, calls = dict(calls), {}
        _, plain = _run(src, tmp_path / "b", cache_outputs=False)
        n_plain = dict(calls)
    finally:
        handle.remove()
    assert cached.keys() == plain.keys() and len(cached) >= 8
    for k in cached:
        assert torch.equal(cached[k].codes, plain[k].codes), k
        assert torch.equal(cached[k].scale, plain[k].scale), k
    batches_x_layers = len(_ids()) * ckpt.config["num_hidden_layers"]
    assert set(n_cached) == norms
    for name in norms:
        assert n_cached[name] == 2 * batches_x_layers, (name, n_cached, n_plain)
        assert n_plain[name] > n_cached[name], (name, n_cached, n_plain)


def test_true_sequential_changes_later_groups_only(tiny32: Path, tmp_path: Path) -> None:
    _, ts = _run(tiny32, tmp_path / "a", true_sequential=True)
    _, flat = _run(tiny32, tmp_path / "b", true_sequential=False)
    first = "model.layers.0.self_attn.q_proj"  # sees the same input either way
    assert torch.equal(ts[first].codes, flat[first].codes)
    assert not torch.equal(
        ts["model.layers.0.mlp.down_proj"].codes, flat["model.layers.0.mlp.down_proj"].codes
    )


def test_every_linear_beats_rtn(tiny32: Path, tmp_path: Path) -> None:
    res, _ = _run(tiny32, tmp_path / "w")
    assert len(res.reports) == 21
    for r in res.reports:
        assert r["gptq_rel_error"] < r["rtn_rel_error"], r


def test_hidden_states_held_once(tiny32: Path, tmp_path: Path, monkeypatch) -> None:
    """A layer's outputs replace its inputs in the one hidden-state store: no second copy of
    ``tokens x hidden`` beside the passes' caches (the memory plan counts one)."""
    from qtool.runner.layers import Session

    made: list[str] = []
    stash = Session.stash

    def counting(self: Session, name: str):  # type: ignore[no-untyped-def]
        made.append(name)
        return stash(self, name)

    monkeypatch.setattr(Session, "stash", counting)
    _run(tiny32, tmp_path / "w")
    assert made.count("hidden") == 1 and len(made) > 1


def test_finished_layer_dropped_before_the_next(tiny32: Path, tmp_path: Path, monkeypatch) -> None:
    """A layer's quantized tensors are saved to the resume folder and dropped before the next
    layer starts (they are read back lazily at the end): at 8B widths, held through the next
    layer, they raised its peak by their 208 MiB."""
    import gc
    import weakref

    from qtool.runner import sequential

    real = sequential._quantize_layer
    alive: list[weakref.ref] = []
    held: list[int] = []

    def tracked(*a, **k):  # type: ignore[no-untyped-def]
        held.append(sum(r() is not None for r in alive))
        results, reports = real(*a, **k)
        alive.extend(weakref.ref(q) for _, q in results)
        return results, reports

    monkeypatch.setattr(sequential, "_quantize_layer", tracked)
    gc.disable()  # freed by their references going, not by a collection that happens to run
    try:
        _run(tiny32, tmp_path / "w")
    finally:
        gc.enable()
    assert len(held) > 1 and alive
    assert held == [0] * len(held), held


@pytest.mark.slow  # 110 s; the tiny model's every-linear check above stays in the default suite
def test_smollm2_every_layer_beats_rtn(assets, tmp_path: Path) -> None:
    """On SmolLM2 and real text (Canterbury), GPTQ's ||WX - QX|| / ||WX|| is below RTN's for
    every linear of all 30 layers (210), each measured on the inputs that layer really sees
    (earlier layers quantized)."""
    from qtool.calibrate.pipeline import CalibrateOptions, prepare

    ckpt = open_checkpoint(str(assets.smollm2_hf))
    copts = CalibrateOptions(dataset="canterbury", samples=8, seq_len=256)
    ids = prepare(ckpt, copts).samples.ids
    opts = SequentialOptions()
    grids = _grids(ckpt, QuantScheme(4, group_size=64))
    wd = WorkDir.open(tmp_path / "w", run_identity(ckpt, ids, opts, grids), resume=False)
    res = gptq_model(ckpt, ids, grids, opts, wd)
    assert len(res.reports) == 210
    worse = [r["name"] for r in res.reports if r["gptq_rel_error"] >= r["rtn_rel_error"]]
    assert not worse, worse
    mean_gain = sum(r["gptq_rel_error"] / r["rtn_rel_error"] for r in res.reports) / 210
    assert mean_gain < 0.8


# -- resume ---------------------------------------------------------------------------------------


def _cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "qtool", "quantize", str(src), "--method", "gptq", "--bits", "4",
        "-g", "64", "-d", "canterbury", "-n", "24", "-L", "128", "-o", str(out), *extra,
    ]  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("every", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_same_bytes(deep_tok: Path, tmp_path: Path, every: int) -> None:
    """Killed right after layer 4 was recorded, resumed, identical bytes. ``every``: layers
    between hidden-state checkpoints (3: the last one holds layer 3's input, and the resumed run
    recomputes layer 3 from its saved codes, as a big model's run does)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QTOOL_CHECKPOINT_EVERY": str(every)}
    full = tmp_path / "full"
    subprocess.run(_cmd(deep_tok, full), check=True, env=env, capture_output=True)

    out = tmp_path / "resumed"
    work = tmp_path / "work"
    run_killed_after_layers(_cmd(deep_tok, out, "--resume", str(work))[3:], 4, env)
    assert not out.exists()
    state = json.loads((work / STATE).read_text())
    assert state["layers_done"] == 4 and state["hidden_at"] == 4 // every * every

    r = subprocess.run(
        _cmd(deep_tok, out, "--resume", str(work)), env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "resuming at layer 4" in r.stderr
    assert ("(recomputed)" in r.stderr) == (every == 3), r.stderr
    assert _sha(out) == _sha(full)
    assert not work.exists()  # removed once the output is complete


def test_resume_from_another_run_refused(cli, deep_tok: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(str(deep_tok))
    opts = SequentialOptions()
    work = tmp_path / "work"
    grids = _grids(ckpt, QuantScheme(3, group_size=64))
    wd = WorkDir.open(work, run_identity(ckpt, _ids(), opts, grids), resume=False)
    wd.save_layer(0, [], [], None)
    r = cli(*_cmd(deep_tok, tmp_path / "o", "--resume", str(work))[3:])
    assert r.exit_code == 2
    assert "another run" in r.stderr
    assert not (tmp_path / "o").exists()


def test_interrupted_run_not_silently_restarted(cli, deep_tok: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    work = tmp_path / "o.qtool-gptq"
    work.mkdir()
    (work / STATE).write_text(json.dumps({"run": {}, "layers_done": 2}))
    r = cli(*_cmd(deep_tok, out)[3:])
    assert r.exit_code == 2
    assert "--resume" in r.stderr and "interrupted" in r.stderr
