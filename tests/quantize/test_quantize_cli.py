"""``qtool quantize --method rtn|gptq|bitnet`` end to end: what transformers loads equals qtool's
own dequantized model, SmoothQuant keeps the float model's function, and every bad input gets
one line, an exit code and no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qtool.checkpoint import open_checkpoint
from qtool.models import family_for
from tests.conftest import make_tiny_llama, with_tokenizer


def quantized_names(ckpt) -> list[str]:
    """The decoder linears RTN/GPTQ quantize (the family's predicate)."""
    fam = family_for(ckpt.config)
    return [n.removesuffix(".weight") for n, t in ckpt.tensors.items() if fam.is_linear(n, t.shape)]


TOKENS = torch.tensor([[1, 17, 230, 5, 999, 42, 7, 311, 64, 128, 3, 900, 12, 77, 500, 2]])


@pytest.fixture(scope="module")
def tok32(tmp_path_factory: pytest.TempPathFactory, assets) -> Path:
    """A float32 tiny Llama with SmolLM2's tokenizer (calibration needs one)."""
    path = make_tiny_llama(
        tmp_path_factory.mktemp("q") / "tok32", dtype="float32", vocab_size=49152
    )
    return with_tokenizer(path, assets)


def _logits(path: Path, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    with torch.no_grad():
        return model(TOKENS).logits[0]


def test_rtn_mse_compressed_tensors_loads_in_transformers(cli, tok32: Path, tmp_path: Path):
    out = tmp_path / "w4"
    r = cli("quantize", tok32, "--method", "rtn", "--bits", "4", "-g", "64", "--clip", "mse",
            "--format", "compressed-tensors", "-o", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    d = r.json()["outputs"][0]
    assert d["format"] == "compressed-tensors" and d["scheme"]["clip"] == "mse"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert "rtn" in (out / "README.md").read_text().lower()

    from transformers import AutoModelForCausalLM

    from qtool.evaluate.dequantized import apply_dequantized
    from qtool.grids.affine import Clip, QuantScheme, quantize_weight

    ckpt = open_checkpoint(str(tok32))
    scheme = QuantScheme(4, group_size=64, clip=Clip.parse("mse"))
    weights = {
        n: quantize_weight(n, ckpt.read(n + ".weight").float(), scheme)
        for n in quantized_names(ckpt)
    }
    ref = AutoModelForCausalLM.from_pretrained(tok32, dtype=torch.float32)
    apply_dequantized(ref, weights)
    with torch.no_grad():
        want = ref(TOKENS).logits[0]
    got = _logits(out)
    # Same dequantized weights, same float32 forward: identical up to summation order.
    assert (got - want).abs().max().item() < 1e-5


def test_smoothquant_is_function_preserving(tok32: Path) -> None:
    """Before any rounding, W diag(s) with the norm divided by s computes the same model."""
    from transformers import AutoModelForCausalLM

    from qtool.calibrate.pipeline import CalibrateOptions, calibrate, prepare
    from qtool.methods.smoothquant import smoothquant

    ckpt = open_checkpoint(str(tok32))
    opts = CalibrateOptions(dataset="canterbury", samples=4, seq_len=64)
    stats = calibrate(prepare(ckpt, opts), opts)
    sm = smoothquant(ckpt, stats, 0.5)
    assert len(sm.factors) == 10 and len(sm.norms) == 4
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in sm.factors.values())
    model = AutoModelForCausalLM.from_pretrained(tok32, dtype=torch.float32)
    with torch.no_grad():
        before = model(TOKENS).logits[0]
        params = dict(model.named_parameters())
        for name, s in sm.factors.items():
            params[name + ".weight"].mul_(s[None, :])
        for name, g in sm.norms.items():
            params[name].copy_(g)
        after = model(TOKENS).logits[0]
    assert (before - after).abs().max().item() < 1e-4 * before.abs().max().item()


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_smoothquant_loads_and_matches_reference(cli, tok32: Path, tmp_path: Path, static):
    stats = tmp_path / "s.safetensors"
    r = cli("calibrate", tok32, "-d", "canterbury", "-n", "4", "-L", "64", "-o", stats)
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "w8a8"
    args = ["quantize", tok32, "--method", "rtn", "--bits", "8", "-g", "-1", "--act-bits", "8",
            "--smoothquant", "0.5", "--stats", stats, "-o", out, "--json"]  # fmt: skip
    if static:
        args.append("--act-static")
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    acts = cfg["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is (not static)

    from transformers import AutoModelForCausalLM

    from qtool.evaluate.dequantized import apply_dequantized
    from qtool.formats.folder import ActivationQuant
    from qtool.grids.affine import QuantScheme, quantize_weight
    from qtool.methods.smoothquant import smoothquant, static_input_scales
    from qtool.observers.statsfile import load_stats

    ckpt = open_checkpoint(str(tok32))
    cal = load_stats(stats)
    sm = smoothquant(ckpt, cal, 0.5)
    scheme = QuantScheme(8, granularity="channel")
    names = quantized_names(ckpt)
    weights = {}
    for n in names:
        w = ckpt.read(n + ".weight").float()
        if n in sm.factors:
            w = w * sm.factors[n][None, :]
        weights[n] = quantize_weight(n, w, scheme)
    scales = static_input_scales(cal, names, sm) if static else None
    ref = AutoModelForCausalLM.from_pretrained(tok32, dtype=torch.float32)
    apply_dequantized(
        ref,
        weights,
        ActivationQuant(dynamic=not static, input_scales=scales),
        {k: (lambda v=v: v) for k, v in sm.norms.items()},
    )
    with torch.no_grad():
        want = ref(TOKENS).logits[0]
    got = _logits(out)
    # int8 activation rounding can tip differently at a tie after float reordering: 1e-4
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())


def test_gptq_cli_writes_gptq_format(cli, tok32: Path, tmp_path: Path) -> None:
    out = tmp_path / "g"
    r = cli("quantize", tok32, "--method", "gptq", "--bits", "3", "-g", "64", "--act-order",
            "-d", "canterbury", "-n", "4", "-L", "64", "-o", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["outputs"][0]["format"] == "gptq"
    assert d["gptq_better_than_rtn"] == len(d["layers"]) == 14
    q = json.loads((out / "quantize_config.json").read_text())
    assert q["bits"] == 3 and q["desc_act"] is True and q["group_size"] == 64
    card = (out / "README.md").read_text()
    assert "GPTQ output error" in card and "14/14" in card and "canterbury" in card
    assert not (tmp_path / "g.qtool-gptq").exists()


def test_gptq_batch_size_is_planned_and_solves_the_same_problem(
    cli, tok32: Path, tmp_path: Path
) -> None:
    """``--batch-size 4``: the memory plan counts four samples per forward, and the run solves
    the same problems as one sample at a time. The Hessians are exact sums of float32 group
    sums, and the groups follow the batches (8 of one sample against 2 of four), so they agree
    to float32 rounding; later layers' inputs also come from forwards of another shape."""
    args = ("quantize", tok32, "--method", "gptq", "--bits", "4", "-g", "64",
            "-d", "canterbury", "-n", "8", "-L", "64", "--json")  # fmt: skip
    plans = {b: cli(*args, "-b", b, "-o", tmp_path / "p", "--dry-run") for b in ("1", "4")}
    assert all(r.exit_code == 0 for r in plans.values()), plans["4"].stderr
    host = {b: r.json()["memory"]["host_bytes"] for b, r in plans.items()}
    assert host["4"] > host["1"], host
    runs = {b: cli(*args, "-b", b, "-o", tmp_path / f"b{b}") for b in ("1", "4")}
    assert all(r.exit_code == 0 for r in runs.values()), runs["4"].stderr
    one, four = (runs[b].json()["layers"] for b in ("1", "4"))
    assert [r["name"] for r in one] == [r["name"] for r in four]
    for a, b in zip(one, four, strict=True):
        if a["name"] in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
            # the first layer's q/k: the same inputs (the embeddings, normed row by row), so
            # the same Hessian to float32 rounding of the group sums: the same solve
            assert b["gptq_rel_error"] == pytest.approx(a["gptq_rel_error"], rel=1e-4), (a, b)
        else:  # later inputs went through forwards of another shape (float32 rounding)
            assert b["gptq_rel_error"] == pytest.approx(a["gptq_rel_error"], rel=0.05), (a, b)
        assert b["gptq_rel_error"] < b["rtn_rel_error"]


def test_ragged_groups_refused_for_compressed_tensors_allowed_for_gptq(
    cli, assets, tmp_path: Path
) -> None:
    src = assets.smollm2_hf  # 576 input columns: 4.5 groups of 128
    out = tmp_path / "ct"
    r = cli("quantize", src, "--method", "rtn", "--bits", "4", "--format", "compressed-tensors",
            "-o", out)  # fmt: skip
    assert r.exit_code == 2
    assert "does not divide its 576 input columns" in r.stderr and "-g 64" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "rtn", "--bits", "9"], "between 2 and 8"),
        (["--method", "gptq", "--bits", "1"], "between 2 and 8"),
        (["--method", "rtn"], "needs --bits"),
        (["--method", "gptq", "--bits", "4", "-g", "64"], "needs calibration data"),
        (["--method", "rtn", "--bits", "4", "--clip", "p99"], "unknown clipping"),
        (["--method", "rtn", "--bits", "5", "--format", "gptq"], "2, 3, 4 or 8"),
        (["--method", "rtn", "--bits", "4", "--act-bits", "8"], "W8A8"),
        (["--method", "rtn", "--bits", "4", "--act-static"], "--act-bits 8"),
        (["--method", "rtn", "--bits", "4", "-g", "0"], "-g"),
        (["--method", "rtn", "--bits", "8", "-g", "-1", "--act-bits", "8", "--act-static"],
         "statistics"),
        (["--method", "gptq", "--bits", "4", "--damp", "0"], "--damp"),
        (["--method", "bitnet", "--bits", "3"], "--bits 2"),
        (["--method", "gptq", "--bits", "4", "-d", "canterbury", "-b", "0"], "--batch-size"),
    ],
)  # fmt: skip
def test_bad_options(cli, tok32: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "o"
    r = cli("quantize", tok32, *args, "-o", out)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_weights_refused_nothing_written(cli, assets, tmp_path: Path, method: str) -> None:
    from safetensors.torch import load_file, save_file

    src = make_tiny_llama(tmp_path / "nan", dtype="float32", vocab_size=49152)
    shutil.copy(assets.smollm2_hf / "tokenizer.json", src / "tokenizer.json")
    f = src / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    out = tmp_path / "o"
    calib = ["-d", "canterbury", "-n", "2", "-L", "32"] if method == "gptq" else []
    r = cli("quantize", src, "--method", method, "--bits", "4", "-g", "64", *calib,
            "-o", out)  # fmt: skip
    assert r.exit_code == 2, r.stderr
    assert "model.layers.1.mlp.up_proj" in r.stderr and "NaN" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
    assert not (tmp_path / "o.qtool-gptq").exists()


def test_bitnet_gguf_via_cli(cli, assets, tmp_path: Path) -> None:
    from qtool.gguf_meta import read_gguf
    from tests.export.helpers import build_tiny

    src = build_tiny(tmp_path / "m", "llama", assets.smollm2_hf)
    out = tmp_path / "b.gguf"
    r = cli("quantize", src, "--method", "bitnet", "--type", "TQ1_0", "-o", out,
            "--tokenizer-pre", "smollm", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.json()["outputs"][0]["methods"]["bitnet"] == 14
    _meta, tensors = read_gguf(out)
    assert tensors["blk.0.attn_q.weight"].dtype == "TQ1_0"
    assert tensors["blk.1.ffn_down.weight"].dtype == "TQ1_0"


def test_asym_gptq_format_never_needs_zero_point_0(cli, tmp_path: Path) -> None:
    """GPTQ v1 stores zero - 1 in b bits, so zero 0 is not storable; qtool's asymmetric
    quantization for that format starts its zero points at 1, and a group of non-negative
    weights (which would want 0) still writes and decodes to what qtool evaluated."""
    from safetensors.torch import load_file, save_file

    from qtool.formats.gptq import unpack_weight

    src = make_tiny_llama(tmp_path / "pos", dtype="float32")
    f = src / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.0.mlp.up_proj"
    t[name + ".weight"][:, :64] = t[name + ".weight"][:, :64].abs()  # group 0: no negatives
    save_file(t, str(f), metadata={"format": "pt"})
    out = tmp_path / "o"
    r = cli("quantize", src, "--method", "rtn", "--bits", "4", "-g", "64", "--asym",
            "--format", "gptq", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    q = load_file(str(out / "model.safetensors"))
    parts = {s: q[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
    dense = unpack_weight(parts, 4, torch.float32)

    from qtool.grids.affine import QuantScheme, quantize_weight

    want = quantize_weight(name, t[name + ".weight"], QuantScheme(4, sym=False, group_size=64,
                                                                 min_zero=1))  # fmt: skip
    assert int(want.zero[:, 0].min()) == 1
    assert torch.equal(dense, want.dequantize())


def test_gptq_w8a8_static_scales_from_the_gptq_pass(cli, tok32: Path, tmp_path: Path) -> None:
    """GPTQ with static int8 activations: each linear's input scale is the max |x| its input
    reached in the GPTQ pass (earlier layers quantized) over 127; transformers runs the file."""
    from safetensors.torch import load_file

    out = tmp_path / "g8"
    r = cli("quantize", tok32, "--method", "gptq", "--bits", "8", "-g", "-1", "--act-bits", "8",
            "--act-static", "-d", "canterbury", "-n", "2", "-L", "32", "-o", out,
            "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    d = r.json()
    o = d["outputs"][0]
    assert o["format"] == "compressed-tensors" and o["activations"]["dynamic"] is False
    t = load_file(str(out / "model.safetensors"))
    for rep in d["layers"]:
        got = float(t[rep["name"] + ".input_scale"].float().reshape(-1)[0])
        assert got == pytest.approx(rep["input_absmax"] / 127.0, rel=1e-6)
    logits = _logits(out)
    assert torch.isfinite(logits).all()


def test_rtn_mse_weighted_by_calibration_stats(cli, tok32: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    stats = tmp_path / "s.safetensors"
    assert (
        cli("calibrate", tok32, "-d", "canterbury", "-n", "4", "-L", "64", "-o", stats).exit_code
        == 0
    )
    outs = {}
    for label, extra in (("plain", []), ("weighted", ["--stats", stats])):
        out = outs[label] = tmp_path / label
        r = cli("quantize", tok32, "--method", "rtn", "--bits", "3", "-g", "64", "--clip", "mse",
                "--format", "compressed-tensors", "-o", out, *extra)  # fmt: skip
        assert r.exit_code == 0, r.stderr
    assert (
        "weighted by each input channel's mean x^2" in (outs["weighted"] / "README.md").read_text()
    )
    a = load_file(str(outs["plain"] / "model.safetensors"))
    b = load_file(str(outs["weighted"] / "model.safetensors"))
    scale = "model.layers.0.mlp.down_proj.weight_scale"
    assert not torch.equal(a[scale], b[scale])  # the importance changed the chosen ranges
