"""Real-size checkpoints of every dense family, without their weights.

``configs/`` holds the published ``config.json`` of each model (copied from its Hugging Face
repo). A checkpoint folder is made of it with one safetensors file whose header lists the
tensors transformers builds for that config (a meta-device model; the tied ``lm_head`` left
out, as the published files do) in the config's dtype, and whose data is a sparse file: the
header is written, then the file is truncated to its full size, so an 8B model takes no disk.
``qtool inspect`` must count the published parameters, and ``qtool quantize --type Q4_K_M
--dry-run`` (and Q3_K_M) plan every tensor llama.cpp's file has, each with the type
llama-quantize itself gives it (``llama_model_quantize`` with ``dry_run`` on a sparse F16 GGUF of
the same layout).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

CONFIGS = Path(__file__).parent / "configs"

PRESETS = ("Q4_K_M", "Q3_K_M")
# config file -> (published parameter count, type counts of the published Q4_K_M GGUF files as
# llama.cpp reports loading them, where this llama.cpp's rules are those they were made with;
# Phi-3.5's were made before llama-quantize treated attn_qkv like attn_v)
MODELS: dict[str, tuple[int, dict[str, int] | None]] = {
    "Llama-3.1-8B": (8_030_261_248, {"F32": 66, "Q4_K": 193, "Q6_K": 33}),
    "Llama-3.2-1B": (1_235_814_400, {"F32": 34, "Q4_K": 96, "Q6_K": 17}),
    "Mistral-7B-v0.3": (7_248_023_552, {"F32": 65, "Q4_K": 193, "Q6_K": 33}),
    "Qwen2.5-7B": (7_615_616_512, {"F32": 141, "Q4_K": 169, "Q6_K": 29}),
    "Qwen3-8B": (8_190_735_360, None),
    "gemma-3-1b-pt": (999_885_952, None),
    "Phi-3.5-mini-instruct": (3_821_079_552, None),
    "phi-4": (14_659_507_200, None),
    "gemma-2-2b": (2_614_341_888, None),
    "OLMo-2-0425-1B": (1_484_916_736, None),
    "granite-3.0-2b-instruct": (2_533_531_648, None),
    "SmolLM3-3B": (3_075_098_624, None),
}
# tensors llama.cpp computes with beyond the checkpoint's
GENERATED = {
    "Llama-3.1-8B": {"rope_freqs.weight": [64]},
    "Llama-3.2-1B": {"rope_freqs.weight": [32]},
    "Phi-3.5-mini-instruct": {"rope_factors_long.weight": [48], "rope_factors_short.weight": [48]},
}
DTYPES = {"bfloat16": ("BF16", 2), "float32": ("F32", 4), "float16": ("F16", 2)}


def sparse_checkpoint(name: str, dst: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """``dst/name``: the published config and a weightless model.safetensors of full size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = dst / name
    folder.mkdir(parents=True)
    shutil.copy(CONFIGS / f"{name}.json", folder / "config.json")
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if cfg.get_text_config().tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    dtype, size = DTYPES[raw.get("torch_dtype", "bfloat16")]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n, shape in sorted(shapes.items()):
        nbytes = size
        for d in shape:
            nbytes *= d
        header[n] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)  # the data: a hole
    return folder, shapes


def sparse_gguf(folder: Path, path: Path) -> Path:
    """The F16 GGUF qtool's export would write for ``folder`` (its metadata and tensor table,
    no vocabulary; tensors a source holds quantized, gpt-oss's MXFP4 experts, as they are), the
    tensor data a hole: what llama-quantize's dry run reads."""
    import gguf
    import numpy as np

    from qtool.checkpoint import open_checkpoint
    from qtool.formats.gguf import make_plan
    from qtool.models import family_for

    ckpt = open_checkpoint(str(folder))
    family = family_for(ckpt.config, ckpt.root)
    plan = make_plan(ckpt, family, "F16")
    w = gguf.GGUFWriter(str(path), family.gguf_arch)
    family.write_gguf_metadata(w)
    w.add_file_type(plan.ftype)
    for e in plan.entries:
        if e.qtype in ("F32", "F16"):
            dtype = np.float32 if e.qtype == "F32" else np.float16
            w.add_tensor_info(e.name, e.shape, np.dtype(dtype), e.nbytes)
            continue
        byte_shape = (*e.shape[:-1], e.nbytes // int(np.prod(e.shape[:-1])))
        raw = gguf.GGMLQuantizationType[e.qtype]
        w.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), e.nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout, align = w.fout[0], w.data_alignment
    size = -(-fout.tell() // align) * align + sum(
        -(-e.nbytes // align) * align for e in plan.entries
    )
    fout.truncate(size)
    w.close()
    return path


@pytest.mark.parametrize("name", list(MODELS))
def test_real_size_inspect_and_plan(cli, tmp_path: Path, name: str) -> None:
    from qtool.models import family_for
    from tests.export.helpers import llama_quantize_types

    params, q4km = MODELS[name]
    folder, shapes = sparse_checkpoint(name, tmp_path)
    assert (folder / "model.safetensors").stat().st_blocks * 512 < 2**20  # no data on disk
    n = 0
    for shape in shapes.values():
        k = 1
        for d in shape:
            k *= d
        n += k
    assert n == params  # transformers' own model of the config has the published size

    r = cli("inspect", folder, "--json")
    assert r.exit_code == 0, r.stderr
    report = r.json()
    assert report["params"]["total"] == params
    assert report["model"]["gguf_export_supported"]

    f16 = sparse_gguf(folder, tmp_path / "f16.gguf")
    family = family_for(json.loads((folder / "config.json").read_text()))
    expected = {family.gguf_name(h) for h in shapes if not family.skip(h)}
    expected |= set(GENERATED.get(name, {}))
    for preset in PRESETS:
        r = cli("quantize", folder, "--type", preset, "--dry-run", "--json")
        assert r.exit_code == 0, r.stderr
        plan = {t["name"]: t for t in r.json()["outputs"][0]["tensors"]}
        assert set(plan) == expected
        for g, shape in GENERATED.get(name, {}).items():
            assert plan[g]["shape"] == shape and plan[g]["grid"] == "F32"
        # every tensor gets the type llama-quantize gives it at this size
        assert {n: t["grid"] for n, t in plan.items()} == llama_quantize_types(f16, preset)
        if preset == "Q4_K_M" and q4km is not None:
            counts: dict[str, int] = {}
            for t in plan.values():
                counts[t["grid"]] = counts.get(t["grid"], 0) + 1
            assert counts == q4km
