"""``qtool quantize --method rtn --format compressed-tensors`` against compressed-tensors' own
quantization functions, driven only through the CLI.

For every decoder linear of a float32 one-layer tiny Llama the test reads the written
safetensors, unpacks codes and zero points with compressed-tensors' ``unpack_from_int32`` and the
dense weight with its ``PackedQuantizationCompressor.decompress``, and recomputes everything from
the original weights
with compressed-tensors: a min/max observer (per row, or per row and group of input columns,
``amin``/``amax`` as llm-compressor's ``MinMaxObserver`` reduces them), ``calculate_qparams``
with ``scale_dtype=float16`` and ``lifecycle.forward.quantize``.

Intended differences, each checked precisely rather than by a loose tolerance:

- **Scales**: none. qtool stores float32 scales rounded to float16 (README, "Scales are rounded
  to float16 before the codes are chosen"); compressed-tensors with ``scale_dtype=float16``
  rounds the same float32 ``absmax / 7.5`` or ``(max - min) / 15`` the same way. Equal bit for bit.
- **Zero points (asym)**: compressed-tensors computes ``z = bit_min - min / s`` from the float32
  scale and only then rounds the scale to float16 (``calculate_qparams`` steps 1 and 3), so its
  zero point belongs to a scale it does not store. qtool derives ``z`` from the stored float16
  scale, so that the file decodes to the weights qtool evaluated. The test checks qtool's zero
  points against compressed-tensors' formula applied to the stored scale (exactly), and counts
  where that differs from compressed-tensors' own zero point: it can only where
  ``-min / s`` moves across a half-integer when ``s`` is rounded (relative change <= 2^-11, so
  a shift of at most 15 * 2^-11 = 0.007 steps at 4 bits and 255 * 2^-11 = 0.12 at 8 bits).
  Measured on this model (three granularities together): 23 of 13,312 groups at 4 bits
  (0.17%), 303 of 13,312 at 8 bits (2.3%; at most 2.6% in one case). Bounds per case: 0.5% and
  5%; every such zero point is off by exactly 1.
- **Codes**: given the stored scale and zero point, compressed-tensors rounds ``w / s + z``,
  qtool (as the GPTQ reference ``Quantizer``) rounds ``w / s`` and adds ``z``. Both round half to
  even, so they differ only where ``w / s + z`` is exactly a half-integer in float32 (both
  neighbours are then nearest, ``s / 2`` away) and ``z`` is odd, or where the float32 addition
  itself rounded onto the half. Symmetric schemes have ``z = 0`` in compressed-tensors and agree
  everywhere. Measured: none at 4 bits, 3 of 1,474,560 codes at 8 bits asym (all exact float32
  ties). Checked: every differing code is such a tie, off by 1, and fewer than 1e-4 of all codes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_llama

pytest.importorskip("compressed_tensors")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = [
    (bits, sym, group)
    for bits in (4, 8)
    for sym in (True, False)
    for group in (-1, 64, 128)  # inputs 256 and 384 columns wide: every group divides
]
# Largest allowed fraction of zero points differing from compressed-tensors' own (see above).
ZP_BOUND = {4: 0.005, 8: 0.05}
TIE_BOUND = 1e-4


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer float32 tiny Llama, hidden 256, intermediate 384 (all seven linears;
    full-precision weights, so the scales take every value)."""
    path = tmp_path_factory.mktemp("rtnref") / "tiny32"
    return make_tiny_llama(path, dtype="float32", num_hidden_layers=1, intermediate_size=384)


def minmax_observer(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (group -1) or per row and group of input columns: (min, max) as [out, groups]."""
    rows = w.reshape(w.shape[0], -1, w.shape[1] if group == -1 else group)
    return rows.amin(-1), rows.amax(-1)


@pytest.mark.parametrize(("bits", "sym", "group"), CASES, ids=lambda v: str(v))
def test_rtn_matches_compressed_tensors(cli, tiny32: Path, tmp_path: Path, bits, sym, group):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams, calculate_range
    from safetensors.torch import load_file

    out = tmp_path / "out"
    r = cli("-q", "quantize", tiny32, "--method", "rtn", "--bits", bits, "-g", group,
            "--sym" if sym else "--asym", "--clip", "none", "--format", "compressed-tensors",
            "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized"
    wcfg = qcfg["config_groups"]["group_0"]["weights"]
    strategy = "channel" if group == -1 else "group"
    assert (wcfg["num_bits"], wcfg["symmetric"], wcfg["strategy"], wcfg["type"]) == (
        bits, sym, strategy, "int"
    )  # fmt: skip
    assert wcfg.get("group_size") == (None if group == -1 else group)
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy=strategy,
        group_size=None if group == -1 else group,
        scale_dtype=torch.float16,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    decompressor = BaseCompressor.get_value_from_registry("pack-quantized")
    bit_min, bit_max = calculate_range(args, "cpu")

    original = load_file(tiny32 / "model.safetensors")
    written = load_file(out / "model.safetensors")
    modules = sorted(n[: -len(".weight")] for n in original if n.split(".")[-2] in PROJ)
    assert {n.rsplit(".", 1)[0] for n in written if n.endswith(".weight_scale")} == set(modules)

    zp_differ = zp_total = ties = codes_total = 0
    for m in modules:
        w = original[m + ".weight"].float()
        # compressed-tensors from the original weights
        lo, hi = minmax_observer(w, group)
        ref_scale, ref_zp = calculate_qparams(lo, hi, args)

        # qtool's file, read with compressed-tensors' unpackers
        scale = written[m + ".weight_scale"]
        shape = tuple(written[m + ".weight_shape"].tolist())
        assert shape == tuple(w.shape) and scale.dtype == torch.float32
        codes = unpack_from_int32(written[m + ".weight_packed"], bits, torch.Size(shape))
        if sym:
            assert m + ".weight_zero_point" not in written  # symmetric: no zero point stored
            zp = torch.zeros_like(ref_zp)
        else:
            zp = unpack_from_int32(
                written[m + ".weight_zero_point"], bits, torch.Size(scale.shape), packed_dim=0
            )

        # Scales: bit-identical to compressed-tensors' (float16-rounded, float32-held).
        assert torch.equal(scale, ref_scale), (m, (scale - ref_scale).abs().max().item())

        # Zero points: compressed-tensors' formula on the stored scale, exactly; its own zero
        # point (from the unrounded scale) in all but a few groups, and then off by one.
        if sym:
            assert torch.equal(zp, ref_zp), m
        else:
            on_stored = torch.round(
                torch.clamp(bit_min - torch.clamp(lo, max=0.0) / scale, bit_min, bit_max)
            )
            assert torch.equal(zp.float(), on_stored), m
            diff = zp.int() != ref_zp.int()
            assert ((zp.int() - ref_zp.int()).abs()[diff] == 1).all(), m
            zp_differ += int(diff.sum())
        zp_total += zp.numel()

        # Codes: compressed-tensors' quantize with the stored parameters; differences only at
        # exact float32 ties of w / s + z.
        ref_codes = quantize(w, scale, zp, args, dtype=torch.int8)
        assert ref_codes.shape == codes.shape
        differ = ref_codes != codes
        if differ.any():
            cols = torch.arange(w.shape[1]) // (w.shape[1] if group == -1 else group)
            x = w / scale[:, cols] + zp[:, cols].float()  # what compressed-tensors rounds
            frac = (x - torch.floor(x))[differ]
            assert (frac == 0.5).all(), (m, frac[frac != 0.5][:5])
            assert ((ref_codes.int() - codes.int()).abs()[differ] == 1).all(), m
            assert not sym, "symmetric codes must agree everywhere"
        ties += int(differ.sum())
        codes_total += codes.numel()

        # The dense weight compressed-tensors' decompressor reads from the file is its own
        # dequantize of those codes, and equals fake quantization of w wherever codes agree.
        sd = {k[len(m) + 1 :]: v for k, v in written.items() if k.startswith(m + ".")}
        dense = decompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(dense, dequantize(codes, scale, zp, args))
        fake = dequantize(ref_codes, scale, zp, args)
        assert torch.equal(dense[~differ], fake[~differ]), m

    print(f"w{bits} {'sym' if sym else 'asym'} g{group}: zero points differing "
          f"{zp_differ}/{zp_total}, tie codes {ties}/{codes_total}")  # fmt: skip
    assert zp_differ <= ZP_BOUND[bits] * zp_total
    assert ties <= TIE_BOUND * codes_total
