"""``scripts/bench_floor.py`` (``make bench-floor``) on a tiny Llama: the input groups it times are
the model's (q/k/v share an input, gate/up share one), its sums add up, and a real GPTQ run of
the same settings takes longer than the floor it states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_floor_times_the_models_groups_and_stays_under_a_real_run(
    tiny_tok: Path, tmp_path: Path
) -> None:
    out = tmp_path / "floor.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_floor.py"), "--model", str(tiny_tok),
           "--samples", "4", "--seq-len", "64", "--batch-size", "2", "--device", "cpu",
           "--compute-dtype", "float32", "--reps", "1", "--run", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    floor = report["floor"]
    assert [g["linears"] for g in floor["hessian_groups"]] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert [g["columns"] for g in floor["hessian_groups"]] == [256, 256, 256, 512]
    assert (floor["layers"], floor["batch_size"], floor["compute_dtype"]) == (2, 2, "float32")
    # 4 samples in batches of 2, over 2 layers
    per_batch = floor["layer_forward_ms_per_batch"] / 1e3
    assert floor["forward_s"] == pytest.approx(per_batch * 2 * 2, abs=0.01)
    rows = floor["hessian_groups"][0]["rows"]
    per_layer = sum(g["seconds_per_rows"] for g in floor["hessian_groups"]) * 4 * 64 / rows
    assert floor["hessian_s"] == pytest.approx(per_layer * 2, abs=0.01)
    assert floor["floor_s"] == pytest.approx(floor["forward_s"] + floor["hessian_s"], abs=0.02)
    run = report["run"]
    assert "--batch-size" in run["command"] and run["runner_s"] > 0
    assert 0 < run["floor_over_wall"] < 1
