"""MoE GGUF export against llama.cpp itself: qtool's F32/F16 files equal the output of llama.cpp's
own convert_hf_to_gguf.py (tensor names, shapes, types, bytes and metadata); every preset, with
a per-expert imatrix too, is byte-identical to llama_model_quantize on qtool's F32 file; and
llama.cpp's logits on the file match transformers' on the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.export.helpers import compare_files, llama_logits, llama_quantize
from tests.moe.helpers import MOE_ARCHS, assert_same_as_converter, build_tiny_moe, converter_pair

TP = ("--tokenizer-pre", "smollm")


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory: pytest.TempPathFactory):
    """One tiny checkpoint per MoE family (Mixtral with 8 experts: llama.cpp's n_expert == 8
    rules apply) and qtool's F32 GGUF of it."""
    from qtool.cli.app import main

    d = tmp_path_factory.mktemp("moe-gguf")
    out = {}
    for arch in MOE_ARCHS:
        model = build_tiny_moe(
            d / arch, arch, assets.smollm2_hf, experts=8 if arch == "mixtral" else 4
        )
        f32 = d / f"{arch}-f32.gguf"
        with pytest.raises(SystemExit) as e:
            main(["-q", "export", str(model), "--outtype", "F32", "-o", str(f32), *TP])
        assert e.value.code == 0
        out[arch] = (model, f32)
    return out


def _exporter(cli: Any) -> Any:
    def export(model: Path, out: Path, outtype: str) -> None:
        r = cli("-q", "export", model, "--outtype", outtype, "-o", out, *TP)
        assert r.exit_code == 0, r.stderr

    return export


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_equals_llama_cpp_converter(cli, tiny, llama_src: Path, tmp_path: Path, arch: str) -> None:
    from gguf import GGUFReader

    model, f32 = tiny[arch]
    for outtype in ("F32", "F16"):
        ref, mine = converter_pair(llama_src, model, f32, outtype, tmp_path, _exporter(cli))
        b = assert_same_as_converter(ref, mine)
        shapes = {t.name: list(t.shape) for t in GGUFReader(str(mine)).tensors}
        experts = [n for n in shapes if "_exps" in n]
        assert len(experts) == 2 * 3 and all(len(shapes[n]) == 3 for n in experts)
        n_exp = 8 if arch == "mixtral" else 4
        assert b[f"{b['general.architecture']}.expert_count"] == n_exp
        assert b[f"{b['general.architecture']}.expert_used_count"] == 2


def _per_expert_imatrix(f32: Path) -> tuple[dict[str, np.ndarray], Path, dict[str, object]]:
    """Random importance for every 2-D and 3-D weight, one vector per expert for ``*_exps``
    (llama-imatrix's layout), some experts never routed (count 0: llama.cpp uses 1s there)."""
    from gguf import GGUFReader

    from qtool.calibrate.imatrix import Imatrix, ImatrixEntry

    rng = np.random.default_rng(3)
    entries = {}
    for t in GGUFReader(str(f32)).tensors:
        if len(t.shape) < 2 or t.name.endswith("norm.weight"):
            continue
        n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1
        counts = rng.integers(0, 3, n_mat).astype(np.float32) * 64
        counts[0] = 64
        sums = rng.gamma(0.5, 2.0, (n_mat, int(t.shape[0]))).astype(np.float32) * 64
        entries[t.name] = ImatrixEntry(sums=sums, counts=counts)
    im = Imatrix(entries, ["test"], 1, 64)
    return {n: e.importance.reshape(-1) for n, e in entries.items()}, f32, {"im": im}


@pytest.mark.parametrize(
    "arch,preset,imat",
    [
        ("mixtral", "Q2_K", False),
        ("mixtral", "Q3_K_M", False),
        ("mixtral", "Q4_K_M", False),
        ("mixtral", "Q4_K_S", True),
        ("mixtral", "Q8_0", False),
        ("qwen2_moe", "Q4_K_M", False),
        ("qwen2_moe", "Q3_K_L", True),
        ("qwen2_moe", "Q5_K_M", False),
        ("qwen2_moe", "Q4_0", True),
        ("qwen3_moe", "Q4_K_M", True),
        ("qwen3_moe", "Q6_K", False),
        ("qwen3_moe", "Q2_K", False),
    ],
)
def test_preset_matches_llama_quantize(
    cli, tiny, tmp_path: Path, arch: str, preset: str, imat: bool
) -> None:
    from qtool.calibrate.imatrix import save_imatrix

    model, f32 = tiny[arch]
    ref, mine = tmp_path / "ref.gguf", tmp_path / "mine.gguf"
    args: list[object] = []
    kw = {}
    if imat:
        values, _, extra = _per_expert_imatrix(f32)
        save_imatrix(tmp_path / "im.gguf", extra["im"])  # type: ignore[arg-type]
        args = ["--imatrix", tmp_path / "im.gguf"]
        kw["imatrix"] = values
    llama_quantize(f32, ref, preset, **kw)
    r = cli("-q", "quantize", model, "--method", "kquant", "--type", preset, "-o", mine, *TP, *args)
    assert r.exit_code == 0, r.stderr
    types, data = compare_files(ref, mine)
    assert not types, types
    assert not data, f"{len(data)} tensors differ in bytes: {data[:5]}"


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_llama_cpp_logits_match_transformers(tiny, arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model, f32 = tiny[arch]
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 1024, size=64)]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(f32, ids)
    # float32 on both sides; routing is discrete, so a token whose top-2 experts nearly tie
    # could route differently: the tolerance is float32 reassociation's (~1e-4 of the scale)
    err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
    assert err < 2e-3, err
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.97
