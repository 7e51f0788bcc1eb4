"""Calibrating a model larger than a memory cap stays under the cap.

A synthetic Llama is written as several float32 safetensors shards (one per layer) whose total
exceeds the cap; ``qtool calibrate`` runs in a child process and its peak RSS (``ru_maxrss``
of that process alone, ``scripts/measure.py``) must stay under the cap: only one layer's
weights (or the embedding matrix) are in memory at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import with_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from measure import run_peak  # noqa: E402

GIB = 1 << 30


def write_synthetic_llama(path: Path, *, hidden: int, intermediate: int, layers: int) -> int:
    """A random Llama with SmolLM2's vocabulary size, one float32 shard per layer (plus one for
    the embeddings and one for the head). Returns the bytes of weights written."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
    )
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:  # uniform: several times faster to draw than normal
        return torch.empty(*shape).uniform_(-0.035, 0.035, generator=g)

    weight_map: dict[str, str] = {}
    total = 0
    n_shards = layers + 2

    def shard(i: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, path / name, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    shard(0, {"model.embed_tokens.weight": rand(49152, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(
            i + 1,
            {
                p + "self_attn.q_proj.weight": rand(hidden, hidden),
                p + "self_attn.k_proj.weight": rand(hidden, hidden),
                p + "self_attn.v_proj.weight": rand(hidden, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, hidden),
                p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                p + "mlp.up_proj.weight": rand(intermediate, hidden),
                p + "mlp.down_proj.weight": rand(hidden, intermediate),
                p + "input_layernorm.weight": torch.ones(hidden),
                p + "post_attention_layernorm.weight": torch.ones(hidden),
            },
        )
    shard(
        layers + 1, {"model.norm.weight": torch.ones(hidden), "lm_head.weight": rand(49152, hidden)}
    )
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def peak_rss_of(cmd: list[str]) -> tuple[int, int, str]:
    """Run ``cmd``; return (exit code, peak RSS in bytes of that command alone, stderr). Not
    ``wait4`` from here: a child started by this (large) pytest process would count the
    process's own peak as its own (``scripts/measure.py``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread in conftest.py
    with tempfile.TemporaryFile("w+") as err:
        code, _wall, peak = run_peak(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        return code, peak, err.read()


def check_under_cap(tmp_path: Path, assets, *, cap: int, **shape: int) -> None:
    model = tmp_path / "synthetic"
    weights = write_synthetic_llama(model, **shape)
    with_tokenizer(model, assets)
    assert weights > cap, "the model must not fit under the cap"
    cmd = [
        sys.executable,
        "-m",
        "qtool",
        "calibrate",
        str(model),
        "-d",
        "canterbury",
        "-n",
        "2",
        "-L",
        "64",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "s.safetensors"),
    ]
    code, peak, err = peak_rss_of(cmd)
    assert code == 0, err[-2000:]
    print(
        f"\nweights {weights / GIB:.2f} GiB, cap {cap / GIB:.2f} GiB, peak RSS {peak / GIB:.2f} GiB"
    )
    assert peak < cap, f"peak RSS {peak / GIB:.2f} GiB over the {cap / GIB:.2f} GiB cap"


def test_peak_rss_under_cap(tmp_path: Path, assets) -> None:
    # 369M float32 parameters: 1.37 GiB of weights in 18 shards, a 1.25 GiB cap. Measured peak
    # 0.71 GiB in a warm checkout, 1.02 GiB in a fresh clone (cold caches), whatever the depth.
    check_under_cap(
        tmp_path, assets, cap=int(1.25 * GIB), hidden=1024, intermediate=4096, layers=16
    )


@pytest.mark.slow
def test_peak_rss_under_cap_large(tmp_path: Path, assets) -> None:
    # 738M float32 parameters: 2.75 GiB of weights, a 1.25 GiB cap.
    check_under_cap(tmp_path, assets, cap=int(1.25 * GIB), hidden=2048, intermediate=8192, layers=8)
