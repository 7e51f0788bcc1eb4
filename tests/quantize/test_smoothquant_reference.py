"""``qtool quantize --smoothquant`` (W8A8) against SmoothQuant's formula, driven only through the
CLI.

The reference is the paper's migration (Xiao et al. 2023, eq. 4): for the linears reading one
normalised input, per input channel ``j``

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``max|X_j|`` the calibration absmax that ``qtool calibrate`` wrote (the stats file's
``M.in_absmax`` tensors, read here with safetensors) and ``max|W_j|`` the largest weight of
column ``j`` over the linears sharing that input (Llama: q/k/v after ``input_layernorm``,
gate/up after ``post_attention_layernorm``, as in the SmoothQuant and llm-compressor mappings).
The smoothed model computes ``(X diag(s)^-1) (W diag(s))^T``: the norm's weight becomes
``g / s`` and the linear's weight ``W diag(s)``, which is then int8-quantized per output
channel (symmetric, full range ``absmax / 127.5`` as compressed-tensors' ``calculate_qparams``,
scale rounded to float16 as qtool stores it).

Run with ``--smoothquant 0.5`` (the paper's default) and 0.8 (which tells alpha from
1 - alpha). Checks on the written compressed-tensors (int-quantized) checkpoint:
- folded norms equal ``g / s`` (float32 model: to float32 rounding, rtol 1e-6);
- int8 scales equal compressed-tensors' ``calculate_qparams`` of ``W diag(s)`` computed here
  (to one float16 step, in case the float32 factors differ by an ulp; measured: bit-identical),
  and the codes equal its ``quantize`` with those scales (exactly: 0 differ);
- dequantized with compressed-tensors' decompressor, every smoothed weight is within the RTN
  bound of ``W diag(s)``: ``|deq - W diag(s)| <= (1/2 + 128 * 2^-11) * scale`` per row (half a
  step, plus the float16 rounding of the scale, which can push the row's absmax up to
  ``127.5 * (1 + 2^-11)`` steps, where the code saturates at 127);
- linears whose input no norm produces (o_proj, down_proj) are plain RTN of ``W``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_llama
from tests.export.helpers import small_tokenizer

pytest.importorskip("compressed_tensors")

# (norm, linears reading its output) in every Llama decoder layer
MAPPING = [
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
]
UNSMOOTHED = ("self_attn.o_proj", "mlp.down_proj")
N_LAYERS = 2


def run_cli(*args: object) -> None:
    """``qtool ARGS`` in-process (for module-scoped fixtures; tests use the ``cli`` fixture)."""
    from qtool.cli.app import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def model(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 tiny Llama with norms away from 1 and a 1024-token cut of SmolLM2's
    tokenizer (calibration needs one)."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_llama(
        tmp_path_factory.mktemp("sq") / "model", dtype="float32", num_hidden_layers=N_LAYERS
    )
    small_tokenizer(assets.smollm2_hf, path)
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.rand(t.shape, generator=g) * 0.5 + 0.75
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def stats_file(model: Path) -> Path:
    path = model.parent / "stats.safetensors"
    run_cli("-q", "calibrate", model, "-d", "canterbury", "-n", 4, "-L", 64, "-o", path)
    return path


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_factors_norms_and_codes(
    cli, model: Path, stats_file: Path, tmp_path: Path, alpha: float
) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file

    out = tmp_path / "w8a8"
    r = cli("-q", "quantize", model, "--method", "rtn", "--bits", "8", "-g", "-1",
            "--act-bits", "8", "--smoothquant", alpha, "--stats", stats_file,
            "--format", "compressed-tensors", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "int-quantized"

    stats = load_file(stats_file)
    orig = load_file(model / "model.safetensors")
    written = load_file(out / "model.safetensors")
    args = QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy="channel", scale_dtype=torch.float16
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    decompressor = BaseCompressor.get_value_from_registry("int-quantized")

    def check_linear(name: str, target: torch.Tensor) -> None:
        """The stored int8 weight is compressed-tensors' RTN of ``target``."""
        codes, scale = written[name + ".weight"], written[name + ".weight_scale"]
        assert codes.dtype == torch.int8 and scale.dtype == torch.float32
        lo, hi = target.amin(1, keepdim=True), target.amax(1, keepdim=True)
        ref_scale, zp = calculate_qparams(lo, hi, args)
        # One float16 step of slack in case the float32 factors differ by an ulp from qtool's
        # (the scale is rounded to float16); measured: bit-identical.
        torch.testing.assert_close(scale, ref_scale, rtol=2**-10, atol=0)
        ref_codes = quantize(target, scale, zp, args, dtype=torch.int8)
        n_diff = int((codes != ref_codes).sum())
        assert n_diff == 0, f"{name}: {n_diff} int8 codes differ from RTN of the target weight"
        sd = {"weight": codes, "weight_scale": scale}
        deq = decompressor.decompress(sd, scheme)["weight"]
        bound = (0.5 + 128 * 2**-11) * scale
        assert ((deq - target).abs() <= bound).all(), name

    least_departure = float("inf")
    for i in range(N_LAYERS):
        p = f"model.layers.{i}"
        for norm, linears in MAPPING:
            names = [f"{p}.{lin}" for lin in linears]
            # the linears share one input: the stats agree
            act = stats[f"{names[0]}.in_absmax"]
            for n in names[1:]:
                assert torch.equal(stats[f"{n}.in_absmax"], act), n
            w_max = torch.stack([orig[n + ".weight"].abs().amax(0) for n in names]).amax(0)
            s = act.pow(alpha) / w_max.pow(1 - alpha)  # Xiao et al. 2023, eq. 4
            assert torch.isfinite(s).all() and (s > 0).all()
            least_departure = min(least_departure, float((s - 1).abs().max()))

            g = orig[f"{p}.{norm}.weight"]
            folded = written[f"{p}.{norm}.weight"]
            torch.testing.assert_close(folded, g / s, rtol=1e-6, atol=0)  # measured: equal
            for n in names:
                check_linear(n, orig[n + ".weight"] * s[None, :])
        for lin in UNSMOOTHED:
            check_linear(f"{p}.{lin}", orig[f"{p}.{lin}.weight"])
    # the factors are far from 1 (activations ~3, weights ~0.06), so a missing or wrong
    # migration could not pass the checks above
    assert least_departure > 1.0
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(written[name], orig[name]), name
