"""``qtool quantize --method rtn|gptq``: checkpoint -> (calibration) -> quantized weights ->
GPTQ or compressed-tensors safetensors, with a model card and the footprint report.

Reads top to bottom: check the options, open the model, gather what the method needs
(statistics for static activations and SmoothQuant, samples for GPTQ), quantize (RTN lazily,
one tensor at a time while writing; GPTQ layer by layer into a resumable work directory),
write, measure, report.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtool.arch import is_decoder_linear
from qtool.calibrate.layerwise import Progress
from qtool.calibrate.pipeline import CalibrateOptions, calibrate, prepare
from qtool.calibrate.statsfile import CalibrationStats, load_stats
from qtool.checkpoint import Checkpoint, open_checkpoint
from qtool.errors import BadInputError, UnsupportedError
from qtool.quantize.gptq import GPTQConfig
from qtool.quantize.scheme import QuantizedWeight, QuantScheme, quantize_weight
from qtool.quantize.smooth import Smoothing, smoothquant, static_input_scales

FORMATS = ("gptq", "compressed-tensors")
GPTQ_FORMAT_BITS = (2, 3, 4, 8)


@dataclass
class QuantizeOptions:
    """Everything ``qtool quantize --method rtn|gptq`` takes besides the model."""

    method: str
    scheme: QuantScheme
    output: Path
    format: str | None = None  # None: gptq for GPTQ at 2/3/4/8 bits, else compressed-tensors
    act_bits: int | None = None  # 8: W8A8
    act_static: bool = False
    smooth_alpha: float | None = None
    stats: Path | None = None
    calib: CalibrateOptions = field(default_factory=CalibrateOptions)
    calib_given: bool = False  # --dataset passed explicitly
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    true_sequential: bool = True
    resume: Path | None = None
    measure_dataset: str | None = None
    measure_ctx: int = 256
    measure_chunks: int = 8
    command: str = ""

    def resolved_format(self) -> str:
        if self.format is not None:
            return self.format
        if self.method == "gptq" and self.act_bits is None and self.scheme.bits in GPTQ_FORMAT_BITS:
            return "gptq"
        return "compressed-tensors"


def check_options(o: QuantizeOptions) -> None:
    """The option combinations that cannot work, refused before anything runs."""
    fmt = o.resolved_format()
    if fmt not in FORMATS:
        raise BadInputError(
            f"--format {fmt}: use one of {', '.join(FORMATS)} (or gguf with kquant)"
        )
    if o.act_bits is not None:
        if o.act_bits != 8:
            raise BadInputError(f"--act-bits {o.act_bits}: only 8-bit activations (W8A8)")
        if o.scheme.bits != 8 or o.scheme.granularity != "channel" or not o.scheme.sym:
            raise BadInputError(
                "W8A8 stores int8 weights per output channel, symmetric",
                hint="use --bits 8 --group-size -1 with --act-bits 8",
            )
        if fmt != "compressed-tensors":
            raise BadInputError(
                "--act-bits 8 writes the compressed-tensors int-quantized layout",
                hint="use --format compressed-tensors",
            )
    elif o.act_static or o.smooth_alpha is not None:
        raise BadInputError(
            "--act-static and --smoothquant quantize activations", hint="add --act-bits 8"
        )
    if fmt == "gptq" and o.scheme.bits not in GPTQ_FORMAT_BITS:
        raise BadInputError(
            f"the GPTQ format stores 2, 3, 4 or 8 bits, not {o.scheme.bits}",
            hint="use --format compressed-tensors",
        )
    if o.method == "gptq" and o.smooth_alpha is not None:
        raise UnsupportedError(
            "--smoothquant with --method gptq is not supported yet",
            hint="use --method rtn --smoothquant ALPHA for SmoothQuant W8A8",
        )
    if o.resume is not None and o.method != "gptq":
        raise BadInputError("--resume continues a GPTQ run", hint="use it with --method gptq")


def quantized_names(ckpt: Checkpoint) -> list[str]:
    """Module names of the linears to quantize: every 2-D ``.weight`` inside a decoder layer
    (embeddings, output head and norms stay as they are)."""
    names = [
        n.removesuffix(".weight")
        for n, t in ckpt.tensors.items()
        if is_decoder_linear(n, len(t.shape))
    ]
    if not names:
        raise UnsupportedError(f"{ckpt.source}: no decoder-layer linear weights to quantize")
    return sorted(names, key=_natural)


def _divisor(names: list[str], ckpt: Checkpoint) -> int:
    """The largest power-of-two group size (<= 128) dividing every linear's input."""
    cols = [int(ckpt.tensors[n + ".weight"].shape[1]) for n in names]
    g = 128
    while g > 1 and any(c % g for c in cols):
        g //= 2
    return g


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _rtn_loader(
    ckpt: Checkpoint,
    name: str,
    scheme: QuantScheme,
    factor: torch.Tensor | None,
    importance: torch.Tensor | None,
) -> Callable[[], QuantizedWeight]:
    def load() -> QuantizedWeight:
        w = ckpt.read(name + ".weight").to(torch.float32)
        imp = importance
        if factor is not None:
            w = w * factor[None, :]
            imp = None if imp is None else imp / factor.square()  # the input is x / s
        return quantize_weight(name, w, scheme, importance=imp)

    return load


@dataclass
class QuantizeResult:
    path: Path
    data: dict[str, Any]


def _stats_for(
    o: QuantizeOptions, ckpt: Checkpoint, log: Callable[[str], None]
) -> CalibrationStats:
    if o.stats is not None:
        return load_stats(o.stats, expected_model=ckpt)
    if not o.calib_given:
        raise BadInputError(
            "static activations and SmoothQuant need activation statistics",
            hint="pass --stats FILE from `qtool calibrate`, or --dataset to calibrate now",
        )
    log(f"calibrating on {o.calib.dataset} ({o.calib.samples} x {o.calib.seq_len} tokens)")
    return calibrate(prepare(ckpt, o.calib), o.calib)


def run_quantize(
    src: str,
    o: QuantizeOptions,
    *,
    revision: str | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> QuantizeResult:
    from qtool.quantize.formats import ActivationQuant, WriteRequest, write_checkpoint

    check_options(o)
    fmt = o.resolved_format()
    if fmt == "gptq" and not o.scheme.sym:
        o.scheme = dataclasses.replace(o.scheme, min_zero=1)  # GPTQ v1 cannot store zero 0
    t0 = time.perf_counter()
    ckpt = open_checkpoint(src, revision=revision)
    if ckpt.format != "safetensors":
        raise UnsupportedError(
            f"{ckpt.source}: --method {o.method} reads a safetensors checkpoint, not {ckpt.format}",
            hint="pass the Hugging Face folder or repo id",
        )
    names = quantized_names(ckpt)
    ragged = []
    for n in names:
        shape = tuple(ckpt.tensors[n + ".weight"].shape)
        o.scheme.check_shape(n, shape)
        if o.scheme.ragged(int(shape[1])):
            ragged.append((n, int(shape[1])))
    if ragged:
        n, cols = ragged[0]
        g = o.scheme.group_size
        if fmt != "gptq":
            raise BadInputError(
                f"{n}: --group-size {g} does not divide its {cols} input columns, and "
                f"{fmt} needs whole groups",
                hint=f"use a group size dividing every input (e.g. -g {_divisor(names, ckpt)}), "
                "or --format gptq, which stores a shorter last group",
            )
        log(
            f"warning: --group-size {g} does not divide the input of {len(ragged)} linears "
            f"(e.g. {n}: {cols} columns): their last group holds {cols % g} columns. The GPTQ "
            "format stores that (as AutoGPTQ writes it); vLLM's GPTQ kernels need whole groups"
        )
        if not ckpt.tensors[n + ".weight"].dtype.startswith(("F", "BF")):
            raise UnsupportedError(
                f"{ckpt.source}: {n}.weight is {ckpt.tensors[n + '.weight'].dtype}: "
                "the checkpoint is already quantized",
                hint="quantize the original float checkpoint",
            )

    card: dict[str, Any] = {"command": o.command, "source": src}
    smoothing: Smoothing | None = None
    stats: CalibrationStats | None = None
    weighted_mse = (
        o.method == "rtn" and o.scheme.clip.method == "mse" and (o.stats or o.calib_given)
    )
    if o.smooth_alpha is not None or (o.act_static and o.method == "rtn") or weighted_mse:
        stats = _stats_for(o, ckpt, log)
        ds = stats.meta.get("dataset") or {}
        card.update(dataset=ds.get("spec"), samples=ds.get("samples"), seq_len=ds.get("seq_len"))
    if o.smooth_alpha is not None:
        assert stats is not None
        smoothing = smoothquant(ckpt, stats, o.smooth_alpha)
        card["notes"] = f"SmoothQuant migration strength alpha = {o.smooth_alpha}."

    weights: dict[str, Callable[[], QuantizedWeight]]
    reports: list[dict[str, Any]] = []
    work_dir: Path | None = None
    if o.method == "rtn":
        importance: dict[str, torch.Tensor] = {}
        if weighted_mse:
            assert stats is not None
            importance = {n: _importance(stats, n) for n in names}
            card["notes"] = (
                card.get("notes", "") + " MSE clipping weighted by each input channel's mean "
                "x^2 from the calibration statistics."
            ).strip()
        weights = {
            n: _rtn_loader(
                ckpt,
                n,
                o.scheme,
                smoothing.factors.get(n) if smoothing else None,
                importance.get(n),
            )
            for n in names
        }
    else:
        weights, reports, work_dir, card_gptq = _run_gptq(ckpt, o, progress, log)
        card.update(card_gptq)

    activations = None
    if o.act_bits is not None:
        scales = None
        if o.act_static:
            if o.method == "gptq":
                absmax = {r["name"]: float(r["input_absmax"]) for r in reports}
                scales = {n: max(absmax[n], 1e-8) / 127.0 for n in names}
            else:
                assert stats is not None
                scales = static_input_scales(stats, names, smoothing)
        activations = ActivationQuant(bits=8, dynamic=not o.act_static, input_scales=scales)

    measure = _measurer(src, o, reports) if (o.measure_dataset or reports) else None
    req = WriteRequest(
        source=ckpt,
        out_dir=o.output,
        format=fmt,
        scheme=o.scheme,
        weights=weights,
        method=o.method,
        activations=activations,
        float_overrides=_constants(smoothing.norms if smoothing else {}),
        gptq={**o.gptq.to_json(), "true_sequential": o.true_sequential},
        card=card,
        measure=measure,
    )
    result = write_checkpoint(req)
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
    data: dict[str, Any] = {
        "source": src,
        "output": str(o.output),
        "method": o.method,
        "format": fmt,
        "scheme": o.scheme.to_json(),
        "activations": None
        if activations is None
        else {"bits": 8, "dynamic": activations.dynamic, "smoothquant": o.smooth_alpha},
        "seconds": round(time.perf_counter() - t0, 2),
        **_result_fields(result),
    }
    if reports:
        data["layers"] = reports
        data["gptq_better_than_rtn"] = sum(
            r["gptq_rel_error"] < r["rtn_rel_error"] for r in reports
        )
    return QuantizeResult(o.output, data)


def _importance(stats: CalibrationStats, name: str) -> torch.Tensor:
    import numpy as np

    from qtool.quantize.smooth import stats_name

    return torch.from_numpy(np.asarray(stats[stats_name(stats, name)].importance, np.float32))


def _constants(tensors: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    return {k: (lambda v=v: v) for k, v in tensors.items()}  # type: ignore[misc]


def _result_fields(result: Any) -> dict[str, Any]:
    fields = {}
    for k in ("files", "bytes", "tensor_bytes", "bits_per_weight", "quality", "footprint"):
        v = getattr(result, k, None)
        if v is not None:
            fields[k] = [str(p) for p in v] if k == "files" else v
    return fields


def _run_gptq(
    ckpt: Checkpoint,
    o: QuantizeOptions,
    progress: Progress | None,
    log: Callable[[str], None],
) -> tuple[dict[str, Callable[[], QuantizedWeight]], list[dict[str, Any]], Path, dict[str, Any]]:
    from qtool.quantize.sequential import SequentialOptions, WorkDir, gptq_model, run_identity

    if not o.calib_given and o.resume is None:
        raise BadInputError(
            "--method gptq needs calibration data",
            hint="pass --dataset (e.g. --dataset wikitext2, or canterbury offline)",
        )
    prep = prepare(ckpt, o.calib)
    ids = prep.samples.ids
    seq = SequentialOptions(
        scheme=o.scheme,
        gptq=o.gptq,
        true_sequential=o.true_sequential,
        batch_size=o.calib.batch_size,
        device=o.calib.device,
        input_absmax=o.act_static,
    )
    run = run_identity(ckpt, ids, seq)
    work_path = o.resume or o.output.with_name(o.output.name + ".qtool-gptq")
    work = WorkDir.open(work_path, run, resume=o.resume is not None)
    if o.resume is None:
        log(f"checkpoints in {work_path}; if interrupted, rerun with --resume {work_path}")
    fresh = work.layers_done == 0
    try:
        res = gptq_model(ckpt, ids, seq, work, progress=progress, log=log)
    except BadInputError:
        if fresh:  # bad input will fail the same way again: nothing worth resuming
            shutil.rmtree(work_path, ignore_errors=True)
        raise
    d = prep.dataset
    card = {
        "dataset": d["spec"],
        "samples": d["samples"],
        "seq_len": d["seq_len"],
        "tokens_sha256": d["tokens_sha256"],
        "seconds": res.seconds,
        "device": res.device,
    }
    return res.weights, res.reports, work_path, card


def _measurer(
    src: str, o: QuantizeOptions, reports: list[dict[str, Any]]
) -> Callable[[Path], dict[str, Any]]:
    """Quality for the model card: GPTQ's per-linear output errors against RTN's (measured on
    the calibration inputs), and with ``--eval-dataset`` a ``qtool eval`` of the finished
    folder against the base."""

    def measure(path: Path) -> dict[str, Any]:
        q: dict[str, Any] = {}
        if reports:
            n = len(reports)
            q["GPTQ output error, mean ||(W-Q)X||/||WX||"] = round(
                sum(r["gptq_rel_error"] for r in reports) / n, 5
            )
            q["RTN output error, same scheme"] = round(
                sum(r["rtn_rel_error"] for r in reports) / n, 5
            )
            q["linears where GPTQ beats RTN"] = (
                f"{sum(r['gptq_rel_error'] < r['rtn_rel_error'] for r in reports)}/{n}"
            )
        if not o.measure_dataset:
            return q
        from qtool.evaluate.runner import EvalSettings, run_eval

        r = run_eval(
            EvalSettings(
                artifacts=[str(path)],
                base=src,
                dataset=str(o.measure_dataset),
                ctx=o.measure_ctx,
                chunks=o.measure_chunks,
            )
        )
        a = r["artifacts"][0]
        q.update(
            {
                "eval text": f"{r['settings']['dataset']} ({r['settings']['chunks']} x "
                f"{o.measure_ctx} tokens, {r['tokens']['scored']} scored)",
                "base PPL": round(float(r["base"]["ppl"]), 4),
                "PPL": round(float(a["ppl"]), 4),
                "delta PPL": round(float(a["delta_ppl"]), 4),
                "KLD mean": round(float(a["kld"]["mean"]), 6),
                "KLD p99": round(float(a["kld"]["p99"]), 6),
                "top-1 agreement": round(float(a["top1"]), 4),
            }
        )
        return q

    return measure
