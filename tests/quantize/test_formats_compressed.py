"""compressed-tensors output read back by the compressed-tensors package and transformers (CPU).

Loading modes on CPU (transformers 5 + compressed-tensors 0.20):

- plain ``AutoModelForCausalLM.from_pretrained(out)`` keeps the layers compressed
  (``quantization_status: compressed``) and decompresses the weight in each forward; for
  int-quantized W8A8 it also fake-quantizes the linear inputs to int8. It works for symmetric
  pack-quantized and for int-quantized, not for asymmetric pack-quantized (transformers 5.23
  refuses the packed ``weight_zero_point`` shape: "ignore_mismatched_sizes"), which therefore
  loads with ``CompressedTensorsConfig(dequantize=True)`` (decoded once into dense weights;
  drops activation quantization, so W8A8 is checked in plain mode only).

Tolerance: both sides hold the same float32 weights (fp16 scales widen exactly; ``(q - z) * s``
is exact in float32) and run the same float32 ops, so the logits are expected bit-identical;
the checks allow 1e-5 absolute for a different matmul path, and W8A8 1e-4 (an activation exactly
on a rounding tie could round differently if the division were reassociated). Measured: 0.0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from qtool.formats.folder import ActivationQuant
from qtool.grids.affine import QuantScheme
from tests.quantize.formats_helpers import logits, reference_logits, write

pytest.importorskip("compressed_tensors")

TOL = 1e-5


def _load(out: Path, dequantize: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)


def _decompressor_weights(out: Path) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as the compressed-tensors package decodes it from the
    files (``PackedQuantizationCompressor`` / ``IntQuantizationCompressor.decompress``), the
    scales widened to float32 first as a float32 model holds them."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    scheme = QuantizationScheme(
        targets=group["targets"],
        weights=group["weights"],
        input_activations=group["input_activations"],
    )
    comp = BaseCompressor.get_value_from_registry(qcfg["format"])
    tensors = load_file(out / "model.safetensors")
    modules = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale")}
    res = {}
    for m in modules:
        sd = {k[len(m) + 1 :]: v for k, v in tensors.items() if k.startswith(m + ".")}
        sd["weight_scale"] = sd["weight_scale"].float()
        res[m] = comp.decompress(sd, scheme)["weight"]
    return res


CASES = {
    "w4a16-sym-g64": (QuantScheme(bits=4, group_size=64), None, False),
    "w4a16-sym-g128": (QuantScheme(bits=4, group_size=128), None, False),
    "w8a16-sym-channel": (QuantScheme(bits=8, granularity="channel"), None, False),
    "w4a16-asym-g64": (QuantScheme(bits=4, sym=False, group_size=64), None, True),
    "w3a16-asym-channel": (QuantScheme(bits=3, sym=False, granularity="channel"), None, True),
    "w6a16-sym-tensor": (QuantScheme(bits=6, granularity="tensor"), None, False),
    "w8a8-dynamic": (QuantScheme(bits=8, granularity="channel"), ActivationQuant(), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_and_matches_reference(case: str, tiny_llama: Path, tmp_path: Path):
    """transformers' logits equal qtool's apply_dequantized model; the package's decompressor
    returns exactly qtool's dequantized weights (torch.equal)."""
    scheme, acts, dequantize = CASES[case]
    loaders, out = write(tiny_llama, tmp_path / case, "compressed-tensors", scheme, acts)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == ("int-quantized" if acts else "pack-quantized")
    assert qcfg["ignore"] == ["lm_head"] and qcfg["quantization_status"] == "compressed"
    decoded = _decompressor_weights(out)
    assert set(decoded) == set(loaders)
    for m, w in decoded.items():
        assert torch.equal(w, loaders[m]().dequantize()), m
    got = logits(_load(out, dequantize=dequantize))
    ref = reference_logits(tiny_llama, loaders, acts)
    assert (got - ref).abs().max().item() <= (1e-4 if acts else TOL)


def test_w8a8_static_input_scales(tiny_llama: Path, tmp_path: Path) -> None:
    """Static per-tensor int8 activations: ``input_scale`` stored per linear and applied by
    compressed-tensors' forward exactly as qtool's reference applies it."""
    from qtool.checkpoint import open_checkpoint
    from tests.quantize.formats_helpers import linear_modules

    mods = linear_modules(open_checkpoint(str(tiny_llama)))
    scales = {m: 0.01 + 0.001 * i for i, m in enumerate(mods)}  # coarse enough to clip
    acts = ActivationQuant(dynamic=False, input_scales=scales)
    scheme = QuantScheme(bits=8, granularity="channel")
    loaders, out = write(tiny_llama, tmp_path / "w8a8s", "compressed-tensors", scheme, acts)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ia = qcfg["config_groups"]["group_0"]["input_activations"]
    assert ia["strategy"] == "tensor" and ia["dynamic"] is False
    model = _load(out)
    layer = model.get_submodule(mods[3])
    assert layer.input_scale.item() == pytest.approx(scales[mods[3]])
    got = logits(model)
    ref = reference_logits(tiny_llama, loaders, acts)
    plain = reference_logits(tiny_llama, loaders, None)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - plain).abs().max().item() > 1e-3  # the activation quantization did run


def test_act_order_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    from qtool.errors import BadInputError

    def perm(qw):
        qw.g_idx = (torch.randperm(qw.shape[1]) // 64).to(torch.int32)

    with pytest.raises(BadInputError, match="act-order"):
        write(tiny_llama, tmp_path / "ao", "compressed-tensors", QuantScheme(group_size=64),
              edit=perm)  # fmt: skip
    assert not (tmp_path / "ao").exists() and not list(tmp_path.glob(".ao.*"))


def test_smollm2_w4a16_g64(assets, tmp_path: Path) -> None:
    """SmolLM2-135M (30 layers, 576/1536, tied embeddings), W4A16 sym g64: plain transformers
    load equals apply_dequantized; no lm_head tensor is written (tied). ~25 s on 2 cores."""
    t0 = time.time()
    loaders, out = write(assets.smollm2_hf, tmp_path / "smol", "compressed-tensors",
                         QuantScheme(bits=4, group_size=64))  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    got = logits(_load(out))
    ref = reference_logits(assets.smollm2_hf, loaders)
    assert (got - ref).abs().max().item() <= TOL
    print(f"smollm2 w4a16: {time.time() - t0:.1f}s")
