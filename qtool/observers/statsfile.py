"""The calibration stats file: safetensors tensors + JSON metadata.

Tensors, per linear layer ``M`` (its Hugging Face module name, e.g.
``model.layers.0.self_attn.q_proj``):

==========================  =======  ==========================================================
``M.in_sum_sq``             F32 [in] Σ x² per input channel (the importance matrix numerator)
``M.in_count``              I64 [1]  tokens seen
``M.in_absmax``             F32 [in] max |x| per input channel
``M.in_min`` / ``M.in_max`` F32 [in] running min / max per input channel
``M.in_hist``               I64 [B]  histogram of |x| over ``[0, M.in_hist_range]``
``M.in_hist_range``         F32 [1]  its upper edge (a power of two)
``M.out_absmax``            F32 [out] max |y| per output channel (absent for ``lm_head``)
``M.out_range``             F32 [2]  output min, max
``M.in_hessian``            F32 [in, in] Σ x xᵀ (``--hessian`` only; once per shared input)
``__model__.weight_sample`` F32 [k]  a few weights of the model, to recognise it
==========================  =======  ==========================================================

``__metadata__["qtool.calibration"]`` holds the JSON: format version, model (source, config
numbers, the tensors sampled), dataset (spec, resolved revision, text and token hashes,
samples, seq_len, seed), tokens seen, layer names with their GGUF names and shared inputs,
device, dtype and timings.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtool.checkpoint import Checkpoint, open_checkpoint
from qtool.errors import BadInputError, CorruptFileError
from qtool.io import atomic_file
from qtool.models.spec import ModelSpec
from qtool.observers.stats import LinearStats

FORMAT = "qtool.calibration"
VERSION = 1
META_KEY = "qtool.calibration"
SAMPLE_TENSORS = 8  # tensors the weight sample is drawn from
SAMPLE_PER_TENSOR = 64  # elements per tensor
_ST_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# Config numbers that must match for stats to belong to a model.
IDENTITY_KEYS = (
    "model_type",
    "n_layers",
    "hidden",
    "intermediate",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "vocab",
)


class StatsMismatchError(BadInputError):
    """A stats file was computed for another model than the one it is used with."""


@dataclass
class CalibrationStats:
    """A loaded (or freshly computed) stats file."""

    meta: dict[str, Any]
    layers: dict[str, LinearStats]
    weight_sample: np.ndarray | None = None
    path: Path | None = None
    gguf_names: dict[str, str] = field(default_factory=dict)  # HF module -> GGUF weight name
    seconds: float | None = None  # how long the calibration took (reported, not stored)

    @property
    def tokens(self) -> int:
        return int(self.meta.get("tokens_seen", 0))

    def importance(self, name: str) -> np.ndarray:
        """Mean squared input per channel of layer ``name`` (HF module or GGUF weight name)."""
        return self[name].importance

    def __getitem__(self, name: str) -> LinearStats:
        if name in self.layers:
            return self.layers[name]
        for hf, g in self.gguf_names.items():
            if g == name:
                return self.layers[hf]
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# model identity
# --------------------------------------------------------------------------------------------


def model_identity(ckpt: Checkpoint) -> dict[str, Any]:
    """The config numbers that define a model's shape, for matching stats to models."""
    spec = ModelSpec.from_config(ckpt.config)
    return {
        "source": ckpt.source,
        "model_type": spec.model_type,
        "architecture": spec.architecture,
        "n_layers": spec.n_layers,
        "hidden": spec.hidden,
        "intermediate": spec.intermediate,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "vocab": spec.vocab,
        "max_context": spec.max_context,
        "tied_embeddings": spec.tied_embeddings,
        "dtype": spec.dtype,
    }


def sample_weights(
    ckpt: Checkpoint, names: list[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """A few elements of a few float tensors, read straight from the files (no full tensor is
    loaded). ``names`` picks the tensors; by default ``SAMPLE_TENSORS`` of the 2-D ones, evenly
    spread over the sorted names. Values are float32 (so a bf16 and an fp16 copy compare)."""
    import torch

    if names is None:
        cands = sorted(
            n for n, t in ckpt.tensors.items() if len(t.shape) == 2 and t.dtype in _ST_TORCH
        )
        step = max(1, len(cands) // SAMPLE_TENSORS)
        names = cands[::step][:SAMPLE_TENSORS]
    out = []
    for n in names:
        info = ckpt.tensors.get(n)
        if info is None or info.dtype not in _ST_TORCH:
            return names, np.zeros(0, dtype=np.float32)
        dt = getattr(torch, _ST_TORCH[info.dtype])
        size = torch.tensor([], dtype=dt).element_size()
        k = min(SAMPLE_PER_TENSOR, info.numel)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            raw = bytearray(f.read(k * size))
        out.append(torch.frombuffer(raw, dtype=dt).float().numpy())
    return names, (np.concatenate(out) if out else np.zeros(0, dtype=np.float32))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def to_tensors(stats: dict[str, LinearStats]) -> dict[str, np.ndarray]:
    """The safetensors tensors of ``stats`` (see the module docstring)."""
    t: dict[str, np.ndarray] = {}
    for name, s in stats.items():
        t[f"{name}.in_sum_sq"] = s.sum_sq.astype(np.float32)
        t[f"{name}.in_count"] = np.array([s.count], dtype=np.int64)
        t[f"{name}.in_absmax"] = s.absmax.astype(np.float32)
        t[f"{name}.in_min"] = s.min.astype(np.float32)
        t[f"{name}.in_max"] = s.max.astype(np.float32)
        t[f"{name}.in_hist"] = s.hist.astype(np.int64)
        t[f"{name}.in_hist_range"] = np.array([s.hist_range], dtype=np.float32)
        if s.out_absmax is not None:
            t[f"{name}.out_absmax"] = s.out_absmax.astype(np.float32)
            t[f"{name}.out_range"] = np.array([s.out_min, s.out_max], dtype=np.float32)
        if s.hessian is not None:
            t[f"{name}.in_hessian"] = s.hessian.astype(np.float32)
    return t


def save_stats(path: Path | str, cal: CalibrationStats) -> None:
    """Write ``cal`` atomically (temporary name, then rename)."""
    from safetensors.numpy import save

    tensors = to_tensors(cal.layers)
    if cal.weight_sample is not None:
        tensors["__model__.weight_sample"] = cal.weight_sample.astype(np.float32)
    meta = dict(cal.meta)
    meta["layers"] = {
        name: {
            "gguf": cal.gguf_names.get(name),
            "in_features": s.in_features,
            "shares_input_with": s.shares_input_with,
        }
        for name, s in cal.layers.items()
    }
    blob = save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    with atomic_file(path) as f:
        f.write(blob)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{path}: not a stats file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20 or n > path.stat().st_size - 8:
                raise CorruptFileError(f"{path}: not a qtool stats file (no safetensors header)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not a qtool stats file ({e})") from e
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise BadInputError(
            f"{path}: a safetensors file but not a qtool stats file (no {META_KEY} metadata)",
            hint="make one with `qtool calibrate MODEL -o stats.safetensors`",
        )
    meta: dict[str, Any] = json.loads(raw)
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise BadInputError(
            f"{path}: stats format {meta.get('format')} v{meta.get('version')} is not readable "
            f"by this qtool (reads {FORMAT} v{VERSION})"
        )
    return meta


def load_stats(
    path: Path | str,
    expected_model: Checkpoint | str | Path | None = None,
    *,
    strict: bool = True,
) -> CalibrationStats:
    """Read a stats file; with ``expected_model``, check it was computed for that model.

    ``expected_model`` is a :class:`~qtool.checkpoint.Checkpoint` or a source (folder, Hub id,
    .gguf). The config numbers (type, layers, widths, heads, vocab) must match; with
    ``strict`` and a safetensors model, so must a sample of the weights (to 1e-2 relative,
    so a dtype conversion of the same model passes). Raises :class:`StatsMismatchError`
    (a :class:`~qtool.errors.BadInputError`, exit 2) naming both models otherwise.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInputError(f"{path}: no such stats file", hint="run `qtool calibrate` first")
    meta = _read_meta(path)
    if expected_model is not None:
        ckpt = (
            expected_model
            if isinstance(expected_model, Checkpoint)
            else open_checkpoint(str(expected_model), headers_only=True)
        )
        check_model(path, meta, ckpt, strict=strict)
    layers: dict[str, LinearStats] = {}
    gguf_names: dict[str, str] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())

            def get(k: str) -> np.ndarray:
                return f.get_tensor(k)

            for name, info in meta.get("layers", {}).items():
                out_range = get(f"{name}.out_range") if f"{name}.out_range" in keys else None
                layers[name] = LinearStats(
                    name=name,
                    in_features=int(info["in_features"]),
                    count=int(get(f"{name}.in_count")[0]),
                    sum_sq=get(f"{name}.in_sum_sq").astype(np.float64),
                    absmax=get(f"{name}.in_absmax"),
                    min=get(f"{name}.in_min"),
                    max=get(f"{name}.in_max"),
                    hist=get(f"{name}.in_hist"),
                    hist_range=float(get(f"{name}.in_hist_range")[0]),
                    out_absmax=get(f"{name}.out_absmax") if out_range is not None else None,
                    out_min=float(out_range[0]) if out_range is not None else None,
                    out_max=float(out_range[1]) if out_range is not None else None,
                    hessian=get(f"{name}.in_hessian") if f"{name}.in_hessian" in keys else None,
                    shares_input_with=info.get("shares_input_with"),
                )
                if info.get("gguf"):
                    gguf_names[name] = info["gguf"]
            sample = get("__model__.weight_sample") if "__model__.weight_sample" in keys else None
    except KeyError as e:
        raise CorruptFileError(f"{path}: stats file is missing tensor {e}") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error kinds
        if isinstance(e, BadInputError):
            raise
        raise CorruptFileError(f"{path}: corrupt stats file ({e})") from e
    return CalibrationStats(meta, layers, sample, path, gguf_names)


def check_model(path: Path, meta: dict[str, Any], ckpt: Checkpoint, *, strict: bool) -> None:
    """Raise :class:`StatsMismatchError` unless the stats in ``path`` belong to ``ckpt``."""
    want = meta.get("model", {})
    have = model_identity(ckpt)
    diffs = [
        f"{k} {want.get(k)} vs {have.get(k)}"
        for k in IDENTITY_KEYS
        if want.get(k) is not None and have.get(k) is not None and want.get(k) != have.get(k)
    ]
    stats_src = want.get("source", "?")
    if diffs:
        raise StatsMismatchError(
            f"{path}: these stats were computed for another model ({stats_src}: "
            f"{'; '.join(diffs)} for {ckpt.source})",
            hint=f"run `qtool calibrate {ckpt.source}` to make stats for this model",
        )
    sample_names = want.get("weight_sample_tensors") or []
    if not strict or not sample_names or ckpt.format != "safetensors" or not ckpt.files:
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        if "__model__.weight_sample" not in set(f.keys()):
            return
        ref = f.get_tensor("__model__.weight_sample")
    _names, got = sample_weights(ckpt, list(sample_names))
    if got.shape != ref.shape or not _close(ref, got):
        raise StatsMismatchError(
            f"{path}: these stats were computed for {stats_src}, whose weights differ from "
            f"{ckpt.source} (same shapes, different values)",
            hint=f"run `qtool calibrate {ckpt.source}` to make stats for this model",
        )


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = float(np.abs(a).max()) if a.size else 0.0
    ok = np.isclose(a, b, rtol=1e-2, atol=1e-3 * scale)
    return bool(ok.mean() >= 0.99) if ok.size else True
