#!/usr/bin/env python3
"""qtool's GPTQ against llm-compressor's GPTQ (``oneshot`` with ``GPTQModifier``) on
SmolLM2-135M, on the CPU, at the same settings, measured in one run.

Settings shared by every run: W4A16, symmetric, group size 64 (SmolLM2's 576-wide inputs divide
by 64, so compressed-tensors stores whole groups), dampening 0.01, lazy blocks of 128 columns,
float32 compute, and the *same* calibration token windows: qtool's ``canterbury`` set (alice29,
asyoulik, lcet10; plrabn12.txt, the evaluation text, is left out) cut into ``--samples`` windows
of ``--seq-len`` tokens by qtool's own sampler, then handed to llm-compressor as a
``datasets.Dataset`` of ``input_ids`` (a hook on its embedding checks that it ran exactly those
rows). Three quantizations, each in a fresh process (wall time; its own peak RSS,
``scripts/measure.py``, and the process tree's, polled):

- ``llm-compressor``: ``GPTQModifier`` with its default ``actorder="static"`` (columns visited by
  decreasing Hessian diagonal, group scales fixed up front from the original weight) and its
  sequential pipeline (each decoder layer calibrated with its float weights on the outputs of
  the quantized layers before it);
- ``qtool-matched``: ``--act-order --static-groups --no-true-sequential --compute-dtype
  float32``, the same algorithm;
- ``qtool-default``: qtool's plain defaults (act-order with static groups, true-sequential
  q/k/v -> o -> gate/up -> down within a layer, the compute dtype chosen for the device:
  bfloat16 forwards on CPUs with bf16 instructions, Hessians in float32).

All three write compressed-tensors ``pack-quantized`` folders; ONE ``qtool eval`` call scores
them against the bf16 base (PPL, KLD, top-1). The agreement check unpacks the integer codes of
every linear (share of identical codes, per layer) and computes ``||WX - ŴX|| / ||WX||`` for a
few linears on the float model's inputs over the first calibration windows (one yardstick for
all). Layer 0 is where qtool-matched and llm-compressor saw the very same inputs; deeper layers
also carry each tool's earlier rounding choices. The solver check then hands both GPTQ solvers
(qtool's ``gptq_quantize``, llm-compressor's ``quantize_weight`` in its venv) the very same
weight and Hessian of those linears: with llm-compressor's group scales rounded to float16, as
qtool stores them, the codes must be identical; with its own float32 scales they differ where
a value sits at a rounding boundary, and GPTQ carries each such difference into later columns.

llm-compressor pins its own versions, so it lives in a virtual env of its own that this script
makes (``--venv``, default ``~/.cache/qtool/bench-peers-venv``, outside git): ``torch==2.13.0``
first (the CPU build; an unpinned torch pulls CUDA), then ``--llmcompressor`` (default the
version this was written against). Nothing from the Hugging Face Hub is used: model and
tokenizer load from the local asset folder.

    .venv/bin/python scripts/bench_peers.py --quick --out bench-peers-quick.json   # 16 x 256
    .venv/bin/python scripts/bench_peers.py --out bench-peers.json                 # 128 x 512

JSON on stdout (and ``--out``), progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from measure import Measured  # noqa: E402

DEFAULT_VENV = Path.home() / ".cache" / "qtool" / "bench-peers-venv"
TORCH_PIN = "torch==2.13.0"
LLMCOMPRESSOR_PIN = "llmcompressor==0.14.0.1"
PEER_PACKAGES = ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets")
# a few linears for the output-error check: layer 0 (identical inputs in both tools), the middle
# and the last layer; every linear is compared by its codes anyway
AGREE_LINEARS = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.15.self_attn.q_proj",
    "model.layers.15.mlp.down_proj",
    "model.layers.29.mlp.down_proj",
)
PAGE = os.sysconf("SC_PAGE_SIZE")

# Run by the peer venv's interpreter (written to a temporary file): llm-compressor's one-shot
# GPTQ on the given token windows, saved as compressed-tensors. Loguru logs to stdout, so the
# result goes to a JSON file.
PEER_SNIPPET = r"""
import hashlib, json, sys, time
t0 = time.perf_counter()
cfg = json.loads(open(sys.argv[1]).read())
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
try:
    from llmcompressor.modifiers.gptq import GPTQModifier
except ImportError:  # older releases: under modifiers.quantization
    from llmcompressor.modifiers.quantization import GPTQModifier
t_import = time.perf_counter() - t0

t1 = time.perf_counter()
ids = load_file(cfg["ids"])["input_ids"]
model = AutoModelForCausalLM.from_pretrained(cfg["source"], dtype=getattr(torch, cfg["dtype"]))
tok = AutoTokenizer.from_pretrained(cfg["source"])
ds = Dataset.from_dict(
    {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
)
t_load = time.perf_counter() - t1


def row_hash(row):
    return hashlib.sha256(row.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


seen = set()
shapes = set()


def on_embed(_module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dtype in (torch.int64, torch.int32):
        shapes.add(int(x.shape[-1]))
        for row in x.reshape(-1, x.shape[-1]):
            seen.add(row_hash(row))


hook = model.get_input_embeddings().register_forward_pre_hook(on_embed)
weights = {
    "num_bits": cfg["bits"],
    "type": "int",
    "symmetric": True,
    "strategy": "group",
    "group_size": cfg["group_size"],
}
recipe = GPTQModifier(
    targets="Linear",
    ignore=["lm_head"],
    actorder=cfg["actorder"],
    dampening_frac=cfg["damp"],
    block_size=cfg["block_size"],
    config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
)
t2 = time.perf_counter()
oneshot(
    model=model,
    dataset=ds,
    recipe=recipe,
    num_calibration_samples=int(ids.shape[0]),
    max_seq_length=int(ids.shape[1]),
    shuffle_calibration_samples=False,
    pipeline="sequential",
)
t_oneshot = time.perf_counter() - t2
hook.remove()

t3 = time.perf_counter()
model.save_pretrained(cfg["output"], save_compressed=True)
tok.save_pretrained(cfg["output"])
t_save = time.perf_counter() - t3
want = {row_hash(r) for r in ids}
result = {
    "import_s": round(t_import, 2),
    "load_s": round(t_load, 2),
    "oneshot_s": round(t_oneshot, 2),
    "save_s": round(t_save, 2),
    "torch_threads": torch.get_num_threads(),
    "calibration_rows_seen": len(seen),
    "calibration_lengths_seen": sorted(shapes),
    "calibration_rows_match": seen == want,
}
with open(cfg["result"], "w") as f:
    json.dump(result, f)
"""

# Run by the peer venv's interpreter: llm-compressor's GPTQ solver alone (``quantize_weight``,
# the function GPTQModifier calls, with the group scales its memoryless min-max observer makes)
# on given weights and Hessians, once with the float32 scales it uses and once with the scales
# rounded to float16 as qtool stores them. Writes the integer codes and the solve times.
SOLVER_SNIPPET = r"""
import json, sys, time
import torch
from safetensors.torch import load_file, save_file
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

cfg = json.loads(open(sys.argv[1]).read())
data = load_file(cfg["inputs"])
bits, group = cfg["bits"], cfg["group_size"]
codes, seconds = {}, {}
for name in cfg["names"]:
    w, h = data[name + ".w"], data[name + ".h"]
    rows, cols = w.shape
    for variant, scale_dtype in (("fp32", None), ("fp16", torch.float16)):
        args = QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group,
            actorder=cfg["actorder"], scale_dtype=scale_dtype,
        )
        grouped = w.reshape(rows, cols // group, group)
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        scale = scale.to(torch.float32)
        t = time.perf_counter()
        q = quantize_weight(
            w[None].clone(), h[None].clone(), scale[None], zero[None], None, args,
            blocksize=cfg["block_size"], percdamp=cfg["damp"],
        )[0][0]
        seconds[f"{name}.{variant}"] = time.perf_counter() - t
        c = torch.round(q / scale.repeat_interleave(group, dim=1)) + (1 << (bits - 1))
        codes[f"{name}.{variant}"] = c.to(torch.uint8).contiguous()
        codes[f"{name}.{variant}.scale"] = scale.contiguous()
save_file(codes, cfg["codes"])
with open(cfg["seconds"], "w") as f:
    json.dump(seconds, f)
"""

VERSIONS_SNIPPET = (
    "import json, importlib.metadata as m, sys\n"
    "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))\n"
)


def log(msg: str) -> None:
    print(f"[bench_peers] {msg}", file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def assets() -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "scripts" / "assets.py")]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


# --------------------------------------------------------------------------------------------
# the peer's virtual env
# --------------------------------------------------------------------------------------------


def peer_versions(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-c", VERSIONS_SNIPPET, *PEER_PACKAGES],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out))


def ensure_peer_venv(venv: Path, spec: str) -> tuple[Path, dict[str, str], float]:
    """The peer venv's python, its package versions, and the seconds spent installing."""
    python = venv / "bin" / "python"
    stamp = venv / ".qtool-bench-peers"
    want = f"{TORCH_PIN} {spec}"
    t0 = time.perf_counter()
    if not (python.exists() and stamp.exists() and stamp.read_text().strip() == want):
        if not python.exists():
            log(f"creating the llm-compressor venv {venv}")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        log(f"installing {TORCH_PIN} (CPU build) into {venv}")
        subprocess.run([*pip, TORCH_PIN], check=True)
        log(f"installing {spec} (torch kept at {TORCH_PIN.split('==')[1]})")
        subprocess.run([*pip, TORCH_PIN, spec], check=True)
        stamp.write_text(want + "\n")
    return python, peer_versions(python), round(time.perf_counter() - t0, 1)


# --------------------------------------------------------------------------------------------
# measured child processes
# --------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    kids = _children()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
        todo.extend(kids.get(p, []))
    return total


def run_measured(
    label: str,
    cmd: list[str],
    work: Path,
    *,
    env: dict[str, str] | None = None,
    status: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Run ``cmd``; stdout and stderr go to ``work/<label>.out|.log``. Wall seconds, peak RSS of
    the process (its own ru_maxrss, ``scripts/measure.py``) and of its process tree (polled
    every 0.25 s), load averages before and after."""
    out_path, log_path = work / f"{label}.out", work / f"{label}.log"
    before = load_avg()
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(log_path, "w") as err:
        measured = Measured(cmd)  # its own peak RSS: not wait4's, which counts this process's
        proc = subprocess.Popen(measured.argv, stdout=out, stderr=err, env=env)
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            last = time.perf_counter()
            while not done.wait(0.25):
                peak[0] = max(peak[0], tree_rss(proc.pid))
                if time.perf_counter() - last >= 60:
                    last = time.perf_counter()
                    extra = f", {status()}" if status else ""
                    log(f"[{label}] {last - t0:.0f} s{extra}, load {load_avg()[0]}")

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        proc.wait()
        done.set()
        th.join()
        proc.returncode, wall, peak_self = measured.result()
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"[{label}] failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    res = {
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_self / 2**20),
        "peak_tree_rss_mib": round(peak[0] / 2**20),
        "load_avg_before": before,
        "load_avg_after": load_avg(),
        "stdout": str(out_path),
        "log": str(log_path),
    }
    log(f"[{label}] {wall:.1f} s, peak RSS {res['peak_rss_mib']} MiB")
    return res


# --------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------


def calibration(src: str, a: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The windows ``qtool quantize -d canterbury -n N -L L --seed S`` uses (the same function
    on the same arguments), saved for llm-compressor."""
    from safetensors.torch import save_file

    from qtool.calibrate.pipeline import CalibrateOptions, prepare

    prep = prepare(
        src,
        CalibrateOptions(dataset="canterbury", samples=a.samples, seq_len=a.seq_len, seed=a.seed),
    )
    ids = prep.samples.ids
    save_file({"input_ids": ids.contiguous()}, str(path))
    d = prep.samples.as_dict()
    d.pop("windows", None)
    return {"dataset": "canterbury", "files": prep.dataset.get("files"), **d}


def qtool_cmd(src: str, out: Path, a: argparse.Namespace, matched: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "qtool", "quantize", src, "--method", "gptq",
        "--bits", str(a.bits), "-g", str(a.group_size), "--sym",
        "--damp", str(a.damp), "--block-size", str(a.block_size),
        "-d", "canterbury", "-n", str(a.samples), "-L", str(a.seq_len), "--seed", str(a.seed),
        "--format", "compressed-tensors", "--device", "cpu", "-o", str(out), "--json",
    ]  # fmt: skip
    if matched:
        cmd += ["--act-order", "--static-groups", "--no-true-sequential",
                "--compute-dtype", "float32"]  # fmt: skip
    return cmd


def run_qtool(label: str, src: str, work: Path, a: argparse.Namespace, matched: bool) -> dict:
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    cmd = qtool_cmd(src, out, a, matched)
    log(f"[{label}] qtool {' '.join(cmd[3:])}")
    state = out.with_name(out.name + ".qtool-gptq") / "state.json"

    def status() -> str:
        try:
            return f"{json.loads(state.read_text())['layers_done']} layers done"
        except (OSError, ValueError, KeyError):
            return "calibrating"

    res = run_measured(label, cmd, work, env=child_env(a), status=status)
    data = json.loads(Path(res["stdout"]).read_text())
    layers = data.get("layers") or []
    res.update(
        path=str(out),
        command="qtool " + " ".join(cmd[3:]),
        config=(
            "act-order, static groups, per-layer Hessians (--no-true-sequential)"
            if matched
            else "qtool defaults: act-order, static groups, true-sequential, compute dtype auto"
        ),
        inner_seconds=data.get("seconds"),
        linears=len(layers),
        gptq_better_than_rtn=data.get("gptq_better_than_rtn"),
    )
    return res


def run_peer(
    python: Path, src: str, ids_path: Path, work: Path, a: argparse.Namespace
) -> dict[str, Any]:
    label = "llm-compressor"
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    snippet = work / "peer_gptq.py"
    snippet.write_text(PEER_SNIPPET)
    result = work / "peer_result.json"
    cfg = {
        "source": src,
        "ids": str(ids_path),
        "output": str(out),
        "result": str(result),
        "dtype": a.peer_dtype,
        "bits": a.bits,
        "group_size": a.group_size,
        "damp": a.damp,
        "block_size": a.block_size,
        "actorder": None if a.peer_actorder == "none" else a.peer_actorder,
    }
    cfg_path = work / "peer_config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    env = child_env(a)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
    )
    log_path = work / f"{label}.out"  # loguru writes to stdout

    def status() -> str:
        try:
            n = log_path.read_text().count("Quantizing ")
        except OSError:
            n = 0
        return f"{n} GPTQ batches done"

    log(f"[{label}] oneshot GPTQModifier(actorder={cfg['actorder']!r}) in {python.parent.parent}")
    cmd = [str(python), str(snippet), str(cfg_path)]
    res = run_measured(label, cmd, work, env=env, status=status)
    inner = json.loads(result.read_text())
    if not inner["calibration_rows_match"]:
        raise SystemExit(
            f"llm-compressor calibrated on other token rows than qtool's ({inner}); see "
            f"{res['stdout']}"
        )
    res.update(
        path=str(out),
        config=f"GPTQModifier actorder={cfg['actorder']}, sequential pipeline, {a.peer_dtype}",
        # as qtool's own "seconds": load, calibrate and quantize, save (not the imports)
        inner_seconds=round(inner["load_s"] + inner["oneshot_s"] + inner["save_s"], 2),
        inner=inner,
    )
    return res


def child_env(a: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if a.threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(a.threads)
    return env


# --------------------------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------------------------


def read_codes(folder: Path) -> dict[str, tuple[Any, Any]]:
    """Every ``pack-quantized`` linear of a compressed-tensors folder: unsigned codes
    ``[out, in]`` (compressed-tensors' signed value + 2^(b-1)) and float32 scales ``[out, G]``."""
    import torch
    from safetensors import safe_open

    from qtool.formats.packing import unpack_rows

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    if cfg.get("format") != "pack-quantized":
        raise SystemExit(f"{folder}: format {cfg.get('format')!r}, expected pack-quantized")
    (group,) = cfg["config_groups"].values()
    bits = int(group["weights"]["num_bits"])
    tensors: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[k] = st.get_tensor(k)
    out: dict[str, tuple[Any, Any]] = {}
    for k, packed in tensors.items():
        if not k.endswith(".weight_packed"):
            continue
        name = k.removesuffix(".weight_packed")
        rows, cols = (int(v) for v in tensors[f"{name}.weight_shape"])
        g_idx = tensors.get(f"{name}.weight_g_idx")
        if g_idx is not None and not torch.equal(
            g_idx.long(), torch.arange(cols) // (cols // tensors[f"{name}.weight_scale"].shape[1])
        ):
            raise SystemExit(f"{folder}: {name} has a non-trivial g_idx (actorder group)")
        if 32 % bits == 0:  # whole codes per word, low bits first: one shift does it
            shifts = torch.arange(0, 32, bits, dtype=torch.int32)
            codes = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)
            codes = codes[:, :cols].to(torch.uint8)
        else:
            codes = unpack_rows(packed, bits, cols).to(torch.uint8)
        out[name] = (codes, tensors[f"{name}.weight_scale"].to(torch.float32))
    return out


def dequantize(codes: Any, scale: Any, bits: int) -> Any:
    import torch

    group = codes.shape[1] // scale.shape[1]
    s = scale.repeat_interleave(group, dim=1)
    return (codes.to(torch.float64) - (1 << (bits - 1))) * s.to(torch.float64)


def float_hessians(src: str, ids: Any, names: list[str]) -> tuple[dict[str, Any], dict]:
    """``X^T X`` (float64) of each named linear's input in the float32 model over ``ids``
    (``ids.numel()`` rows each), and the float weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mods = dict(model.named_modules())
    hs: dict[str, Any] = {}
    hooks = []
    for n in names:
        lin = mods[n]
        hs[n] = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)

        def pre(_m: Any, args: tuple[Any, ...], n: str = n) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            hs[n] += x.T @ x

        hooks.append(lin.register_forward_pre_hook(pre))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    weights = {n: mods[n].weight.detach().to(torch.float64).clone() for n in names}
    return hs, weights


def rel_error(w: Any, w_hat: Any, h: Any) -> float:
    """``||(W - Ŵ) X|| / ||W X||`` from ``H = X^T X``."""
    d = w - w_hat
    num = float(((d @ h) * d).sum().clamp_min(0))
    den = float(((w @ h) * w).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def solver_check(
    python: Path,
    weights: dict[str, Any],
    hs: dict[str, Any],
    tokens: int,
    work: Path,
    a: argparse.Namespace,
) -> dict[str, Any]:
    """Both GPTQ solvers on the very same weight and Hessian ``2/n X^T X`` (float32): qtool's
    ``gptq_quantize`` (act-order and static groups as llm-compressor's actorder) and
    llm-compressor's ``quantize_weight`` in its venv, with its float32 scales and with them
    rounded to float16 as qtool's are. Codes compared, output errors, solve seconds."""
    import torch
    from safetensors.torch import load_file, save_file

    from qtool.grids.affine import QuantScheme
    from qtool.methods.gptq import GPTQConfig, gptq_quantize

    names = list(weights)
    inputs = work / "solver_inputs.safetensors"
    codes_path = work / "solver_codes.safetensors"
    secs_path = work / "solver_seconds.json"
    tensors = {}
    for n in names:
        tensors[f"{n}.w"] = weights[n].to(torch.float32).contiguous()
        tensors[f"{n}.h"] = (hs[n] * (2.0 / tokens)).to(torch.float32).contiguous()
    save_file(tensors, str(inputs))
    cfg = {
        "inputs": str(inputs),
        "codes": str(codes_path),
        "seconds": str(secs_path),
        "names": names,
        "bits": a.bits,
        "group_size": a.group_size,
        "damp": a.damp,
        "block_size": a.block_size,
        "actorder": None if a.peer_actorder == "none" else a.peer_actorder,
    }
    (work / "solver_config.json").write_text(json.dumps(cfg))
    (work / "peer_solver.py").write_text(SOLVER_SNIPPET)
    proc = subprocess.run(
        [str(python), str(work / "peer_solver.py"), str(work / "solver_config.json")],
        capture_output=True,
        text=True,
        env={**child_env(a), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:  # its internals move between releases: report, do not fail
        reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
        log(f"[solver] llm-compressor's quantize_weight could not run: {reason}")
        return {"skipped": reason}
    peer_codes = load_file(str(codes_path))
    peer_secs = json.loads(secs_path.read_text())
    scheme = QuantScheme(bits=a.bits, sym=True, granularity="group", group_size=a.group_size)
    config = GPTQConfig(
        damp=a.damp,
        block_size=a.block_size,
        act_order=a.peer_actorder != "none",
        static_groups=True,  # llm-compressor fits its group scales on the original weight
    )
    rows = []
    for n in names:
        t = time.perf_counter()
        r = gptq_quantize(n, tensors[f"{n}.w"], tensors[f"{n}.h"], scheme, config)
        q_secs = time.perf_counter() - t
        ours = r.weight.codes.to(torch.uint8)
        scale = r.weight.scale.to(torch.float32)
        w = weights[n]
        err_q = rel_error(w, dequantize(ours, scale, a.bits), hs[n])
        row: dict[str, Any] = {"name": n, "rel_error_qtool": round(err_q, 5)}
        for variant in ("fp32", "fp16"):
            theirs = peer_codes[f"{n}.{variant}"]
            row[f"identical_codes_pct_{variant}_scales"] = round(
                100 * float((theirs == ours).to(torch.float64).mean()), 2
            )
        peer_scale = peer_codes[f"{n}.fp32.scale"]
        err_p = rel_error(w, dequantize(peer_codes[f"{n}.fp32"], peer_scale, a.bits), hs[n])
        row["rel_error_llmcompressor"] = round(err_p, 5)
        row["error_ratio_qtool_over_llmcompressor"] = round(err_q / err_p, 4)
        row["solve_s_qtool"] = round(q_secs, 3)
        row["solve_s_llmcompressor"] = round(peer_secs[f"{n}.fp32"], 3)
        rows.append(row)
    return {
        "inputs": "one weight and Hessian per linear, handed to both solvers",
        "linears": rows,
    }


def agreement(
    src: str,
    ids: Any,
    runs: dict[str, str],
    a: argparse.Namespace,
    python: Path,
    work: Path,
) -> dict[str, Any]:
    """Integer codes of every linear compared against llm-compressor's; output errors of
    ``AGREE_LINEARS`` on the float model's inputs (the first ``--agree-samples`` windows), and
    both solvers on those linears' float weights and Hessians (:func:`solver_check`)."""
    import torch

    t0 = time.perf_counter()
    peer = "llm-compressor"
    codes = {label: read_codes(Path(p)) for label, p in runs.items()}
    names = list(codes[peer])
    for label, c in codes.items():
        if set(c) != set(names):
            raise SystemExit(f"{label} quantized other linears than {peer}: {set(c) ^ set(names)}")
    ours = [label for label in runs if label != peer]

    def same(x: Any, y: Any) -> tuple[int, int]:
        return int((x == y).sum()), x.numel()

    overall: dict[str, Any] = {}
    for label in ours:
        per_layer: dict[int, list[int]] = {}
        tot = [0, 0]
        scale_same = [0, 0]
        for n in names:
            s, t = same(codes[label][n][0], codes[peer][n][0])
            layer = int(n.split(".")[2])
            acc = per_layer.setdefault(layer, [0, 0])
            acc[0] += s
            acc[1] += t
            tot[0] += s
            tot[1] += t
            sa, sb = codes[label][n][1], codes[peer][n][1]
            close = torch.isclose(sa, sb, rtol=1e-3, atol=0)
            scale_same[0] += int(close.sum())
            scale_same[1] += close.numel()
        overall[label] = {
            "identical_codes_pct": round(100 * tot[0] / tot[1], 2),
            "identical_codes_pct_per_layer": [
                round(100 * s / t, 2) for _, (s, t) in sorted(per_layer.items())
            ],
            "scales_within_0.1pct_pct": round(100 * scale_same[0] / scale_same[1], 2),
        }

    picked = [n for n in a.agree_linears if n in codes[peer]]
    n_rows = min(a.agree_samples, int(ids.shape[0]))
    log(f"[agreement] float-model inputs of {len(picked)} linears over {n_rows} windows")
    hs, weights = float_hessians(src, ids[:n_rows], picked)
    linears = []
    for n in picked:
        row: dict[str, Any] = {"name": n, "shape": list(weights[n].shape)}
        for label in runs:
            c, s = codes[label][n]
            w_hat = dequantize(c, s, a.bits)
            row[f"rel_error_{label}"] = round(rel_error(weights[n], w_hat, hs[n]), 5)
        for label in ours:
            sm, tt = same(codes[label][n][0], codes[peer][n][0])
            row[f"identical_codes_pct_{label}"] = round(100 * sm / tt, 2)
            row[f"error_ratio_{label}_over_peer"] = round(
                row[f"rel_error_{label}"] / row[f"rel_error_{peer}"], 4
            )
        linears.append(row)
    log(f"[solver] both GPTQ solvers on the same weights and Hessians of {len(picked)} linears")
    solver = solver_check(python, weights, hs, int(ids[:n_rows].numel()), work, a)
    return {
        "reference": peer,
        "linears_compared": len(names),
        "codes": overall,
        "output_error": {
            "inputs": f"float32 base model, first {n_rows} calibration windows",
            "linears": linears,
        },
        "solver": solver,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="qtool-bench-peers-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (128)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (512)")
    ap.add_argument("--seed", type=int, default=0, help="picks the windows (qtool's --seed)")
    ap.add_argument(
        "--quick", action="store_true", help="16 x 256 calibration, 8 eval windows, 8 agreement"
    )
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument(
        "--peer-actorder",
        choices=["static", "none"],
        default="static",
        help="llm-compressor's actorder (static: its default)",
    )
    ap.add_argument(
        "--peer-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype llm-compressor loads the model in (float32: as qtool computes)",
    )
    ap.add_argument("--no-qtool-default", action="store_true", help="skip qtool's default run")
    ap.add_argument("--eval-text", default="canterbury:plrabn12.txt")
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=None, help="eval windows (20)")
    ap.add_argument("--agree-samples", type=int, default=None, help="windows for H (16)")
    ap.add_argument("--agree-linears", nargs="+", default=list(AGREE_LINEARS))
    ap.add_argument("--threads", type=int, default=None, help="OMP threads for every child")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="llm-compressor's venv")
    ap.add_argument(
        "--llmcompressor", default=LLMCOMPRESSOR_PIN, help="pip requirement for llm-compressor"
    )
    ap.add_argument("--keep", type=Path, default=None, help="keep artifacts and logs here")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()
    a.samples = a.samples or (16 if a.quick else 128)
    a.seq_len = a.seq_len or (256 if a.quick else 512)
    a.eval_chunks = a.eval_chunks or (8 if a.quick else 20)
    a.agree_samples = a.agree_samples or (8 if a.quick else 16)
    t_start = time.perf_counter()
    load_start = load_avg()
    log(f"load average {load_start} on {os.cpu_count()} CPUs")

    paths = assets()
    src = paths["smollm2_hf"]
    python, versions, setup_s = ensure_peer_venv(a.venv.expanduser(), a.llmcompressor)
    log(f"llm-compressor venv: {versions}")

    import torch
    from safetensors.torch import load_file

    with workdir(a.keep) as work:
        ids_path = work / "calibration_ids.safetensors"
        calib = calibration(src, a, ids_path)
        log(
            f"calibration: canterbury, {a.samples} x {a.seq_len} tokens, "
            f"sha256 {calib['tokens_sha256'][:16]}…"
        )
        runs: dict[str, dict[str, Any]] = {}
        runs["qtool-matched"] = run_qtool("qtool-matched", src, work, a, matched=True)
        runs["llm-compressor"] = run_peer(python, src, ids_path, work, a)
        if not a.no_qtool_default:
            runs["qtool-default"] = run_qtool("qtool-default", src, work, a, matched=False)

        labels = list(runs)
        cmd = [sys.executable, "-m", "qtool", "eval", *[runs[k]["path"] for k in labels],
               "--base", src, "--dataset", a.eval_text, "--ctx", str(a.eval_ctx),
               "--chunks", str(a.eval_chunks), "--device", "cpu", "--json"]  # fmt: skip
        log(f"[eval] {len(labels)} artifacts against the base on {a.eval_text}")
        ev_run = run_measured("eval", cmd, work, env=child_env(a))
        ev = json.loads(Path(ev_run["stdout"]).read_text())
        by_path = {r["source"]: r for r in ev["artifacts"]}
        for k in labels:
            e = by_path[runs[k]["path"]]
            runs[k]["quality"] = {
                "ppl": e["ppl"],
                "delta_ppl": e["delta_ppl"],
                "kld_mean": e["kld"]["mean"],
                "top1": e["top1"],
                "bits_per_weight": e["bits_per_weight"],
            }

        ids = load_file(str(ids_path))["input_ids"]
        agree = agreement(src, ids, {k: runs[k]["path"] for k in labels}, a, python, work)
        if a.keep is None:  # the folder is about to go
            for r in runs.values():
                for k in ("stdout", "log", "path"):
                    r.pop(k, None)

    peer = runs["llm-compressor"]
    ratios: dict[str, Any] = {}
    for k in labels:
        if k == "llm-compressor":
            continue
        r = runs[k]
        ratios[k] = {
            "time_ratio_vs_llmcompressor": round(r["wall_s"] / peer["wall_s"], 3),
            "inner_time_ratio_vs_llmcompressor": round(
                r["inner_seconds"] / peer["inner_seconds"], 3
            ),
            "peak_rss_ratio_vs_llmcompressor": round(r["peak_rss_mib"] / peer["peak_rss_mib"], 3),
            "ppl_diff_vs_llmcompressor": round(r["quality"]["ppl"] - peer["quality"]["ppl"], 4),
            "kld_diff_vs_llmcompressor": round(
                r["quality"]["kld_mean"] - peer["quality"]["kld_mean"], 5
            ),
            "top1_diff_vs_llmcompressor": round(r["quality"]["top1"] - peer["quality"]["top1"], 4),
        }
    report = {
        "benchmark": "qtool GPTQ vs llm-compressor GPTQ (oneshot)",
        "model": "SmolLM2-135M-Instruct",
        "source": src,
        "settings": {
            "scheme": f"W{a.bits}A16 symmetric, group {a.group_size}",
            "damp": a.damp,
            "block_size": a.block_size,
            "calibration": calib,
            "peer_dtype": a.peer_dtype,
            "device": "cpu",
            "threads": a.threads or torch.get_num_threads(),
        },
        "llmcompressor_env": {
            "venv": str(a.venv.expanduser()),
            "requirement": a.llmcompressor,
            "versions": versions,
            "setup_s": setup_s,
        },
        "runs": runs,
        "eval": {
            "text": a.eval_text,
            "ctx": a.eval_ctx,
            "chunks": ev["settings"]["chunks"],
            "tokens_scored": ev["tokens"]["scored"],
            "base_ppl": ev["base"]["ppl"],
            "wall_s": ev_run["wall_s"],
        },
        "ratios": ratios,
        "agreement": agree,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_start": load_start,
            "load_avg_end": load_avg(),
        },
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(report, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    lines = [
        f"SmolLM2 W{a.bits}g{a.group_size}, {a.samples} x {a.seq_len} calibration; PPL on "
        f"{a.eval_text} ({report['eval']['chunks']} x {a.eval_ctx}); base {ev['base']['ppl']:.3f}",
        "| run | PPL | KLD | top-1 | quantize s | peak RSS MiB | codes = llm-compressor |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in labels:
        r, q = runs[k], runs[k]["quality"]
        same = agree["codes"].get(k, {}).get("identical_codes_pct", 100.0)
        lines.append(
            f"| {k} | {q['ppl']:.3f} | {q['kld_mean']:.4f} | {100 * q['top1']:.1f}% | "
            f"{r['wall_s']} | {r['peak_rss_mib']} | {same}% |"
        )
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
