"""``calibrate()``: dataset -> samples -> layer-by-layer statistics -> :class:`CalibrationStats`.

Every check that can fail on bad input (dataset, text field, sample count, sequence length,
tokenizer/vocab) runs before the model does, so a bad run stops in seconds and writes nothing.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtool import __version__
from qtool.calibrate.datasets import (
    Samples,
    load_documents,
    load_tokenizer,
    make_samples,
    resolve_dataset,
)
from qtool.calibrate.imatrix import Imatrix, entries_from_stats, gguf_weight_name
from qtool.checkpoint import Checkpoint, open_checkpoint
from qtool.errors import BadInputError, PeerError, UnsupportedError
from qtool.events import SILENT, Reporter
from qtool.models.spec import ModelSpec
from qtool.observers.stats import HIST_BINS
from qtool.observers.statsfile import (
    FORMAT,
    VERSION,
    CalibrationStats,
    model_identity,
    sample_weights,
)
from qtool.runner.layers import (
    COMPUTE_DTYPES,
    CalibrationWork,
    calibrate_layerwise,
    dtype_name,
    pick_device,
    resolve_dtype,
)


@dataclass
class CalibrateOptions:
    """What ``qtool calibrate`` takes besides the model."""

    dataset: str = "wikitext2"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str | None = None
    dataset_revision: str | None = None
    tokenizer: str | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"  # compute dtype of the forward passes (auto: bf16 where fast)
    max_memory: int | None = None  # host budget (bytes): the memory plan places the caches
    max_gpu_memory: int | None = None
    hessian: bool = False
    lm_head: bool = True
    all_experts: bool = False  # MoE: every token through every expert for the statistics


@dataclass
class Prepared:
    """A checked run, before the model runs: checkpoint, spec, samples."""

    ckpt: Checkpoint
    spec: ModelSpec
    samples: Samples
    dataset: dict[str, Any]
    tokenizer: str
    notes: list[str]


def prepare(
    src: str | Checkpoint, opts: CalibrateOptions, *, revision: str | None = None
) -> Prepared:
    """Resolve the model and the dataset and make the samples (all the input checks)."""
    if opts.dtype not in COMPUTE_DTYPES:
        raise BadInputError(f"--dtype {opts.dtype}: use one of {', '.join(COMPUTE_DTYPES)}")
    if opts.samples < 1:
        raise BadInputError(f"--samples {opts.samples}: must be at least 1")
    if opts.seq_len < 2:
        raise BadInputError(f"--seq-len {opts.seq_len}: must be at least 2")
    if opts.batch_size < 1:
        raise BadInputError(f"--batch-size {opts.batch_size}: must be at least 1")
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src, revision=revision)
    if not ckpt.hf_layout:
        raise UnsupportedError(
            f"{ckpt.source}: calibrate runs the model from safetensors, not {ckpt.format}",
            hint="pass the Hugging Face checkpoint folder or repo id (for a GGUF file, use "
            "llama-imatrix)",
        )
    spec = ModelSpec.from_config(ckpt.config)
    if spec.max_context and opts.seq_len > spec.max_context:
        raise BadInputError(
            f"--seq-len {opts.seq_len} is beyond the model's context of {spec.max_context} tokens",
            hint=f"use --seq-len {spec.max_context} or less",
        )
    ds_spec = resolve_dataset(
        opts.dataset, text_field=opts.text_field, revision=opts.dataset_revision
    )
    tok_path = opts.tokenizer or str(ckpt.root)
    if opts.tokenizer is None and not _has_tokenizer(ckpt.root):
        raise BadInputError(
            f"{ckpt.source}: no tokenizer files beside the weights",
            hint="pass --tokenizer with a folder (or Hub id) holding the model's tokenizer",
        )
    tokenizer = load_tokenizer(tok_path)
    docs = load_documents(ds_spec)
    samples = make_samples(
        docs, tokenizer, samples=opts.samples, seq_len=opts.seq_len, seed=opts.seed
    )
    top = int(samples.ids.max())
    if spec.vocab and top >= spec.vocab:
        raise BadInputError(
            f"the tokenizer at {tok_path} produced token id {top}, beyond the model's vocabulary "
            f"of {spec.vocab}",
            hint="pass --tokenizer with the tokenizer this model was trained with",
        )
    dataset = {
        **ds_spec.as_dict(),
        "description": ds_spec.description,
        "resolved_revision": docs.resolved_revision,
        "text_field_used": docs.text_field,
        **samples.as_dict(),
    }
    return Prepared(ckpt, spec, samples, dataset, tok_path, list(docs.notes))


def memory_plan(
    ckpt: Checkpoint,
    ids: torch.Tensor,
    opts: CalibrateOptions,
    device: torch.device,
    dtype: torch.dtype,
    *,
    gptq: bool,
    true_sequential: bool = True,
) -> Any:
    """The run's :class:`qtool.runner.memory.MemoryPlan` (raises when no placement fits)."""
    from qtool.runner.memory import plan_memory, shape_of

    return plan_memory(
        shape_of(ckpt),
        tokens=int(ids.numel()),
        batch_tokens=int(ids.shape[1]) * opts.batch_size,
        seq_len=int(ids.shape[1]),
        dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        dtype=dtype_name(dtype),
        device=str(device),
        gptq=gptq,
        true_sequential=true_sequential,
        budget_host=opts.max_memory,
        budget_device=opts.max_gpu_memory,
    )


def _has_tokenizer(root: Path) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    return any((root / n).exists() for n in names)


def calibrate(
    prep: Prepared,
    opts: CalibrateOptions,
    *,
    progress: Reporter | None = None,
    work: CalibrationWork | None = None,
) -> CalibrationStats:
    """Run the model layer by layer on the prepared samples and gather the statistics
    (``work``: the resume folder; see :class:`~qtool.runner.layers.CalibrationWork`)."""
    device = pick_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    mem = memory_plan(prep.ckpt, prep.samples.ids, opts, device, dtype, gptq=False)
    if progress is not None:
        for line in mem.lines():
            progress.debug(line)
    result = calibrate_layerwise(
        prep.ckpt,
        prep.samples.ids,
        batch_size=opts.batch_size,
        device=device,
        dtype=dtype,
        hessian=opts.hessian,
        lm_head=opts.lm_head,
        progress=progress,
        all_experts=opts.all_experts,
        place=mem.placement,
        folder=None if work is None else work.stash_folder(),
        work=work,
    )
    sample_names, sample = sample_weights(prep.ckpt)
    spec = prep.spec
    gguf_names = {
        name: g
        for name in result.stats
        if (g := gguf_weight_name(name, spec.model_type, spec.n_layers)) is not None
    }
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "qtool_version": __version__,
        # no wall-clock time unless SOURCE_DATE_EPOCH names one: the same run, the same bytes
        **({"created": created} if (created := _created()) else {}),
        "model": {**model_identity(prep.ckpt), "weight_sample_tensors": sample_names},
        "dataset": prep.dataset,
        "tokenizer": prep.tokenizer,
        "tokens_seen": result.tokens,
        "device": result.device,
        "dtype": result.dtype,
        "torch_version": torch.__version__,
        "hist_bins": HIST_BINS,
        "hessian": opts.hessian,
        **({"moe": moe_meta(prep.ckpt, result.routed, opts.all_experts)} if result.routed else {}),
    }
    cal = CalibrationStats(meta, result.stats, sample, None, gguf_names)
    cal.seconds = result.seconds
    return cal


def calibration_identity(prep: Prepared, opts: CalibrateOptions) -> dict[str, Any]:
    """What makes two calibrations the same run (a resume folder of another is refused)."""
    ids = prep.samples.ids
    return {
        "model": model_identity(prep.ckpt),
        "samples": {
            "shape": list(ids.shape),
            "tokens_sha256": prep.dataset["tokens_sha256"],
        },
        "options": {
            "batch_size": opts.batch_size,
            "dtype": dtype_name(resolve_dtype(opts.dtype, pick_device(opts.device))),
            "hessian": opts.hessian,
            "lm_head": opts.lm_head,
            "all_experts": opts.all_experts,
        },
        "qtool_version": __version__,
    }


def moe_meta(ckpt: Checkpoint, routed: dict[int, list[int]], all_experts: bool) -> dict[str, Any]:
    """The router statistics of an MoE run: tokens routed to each expert of each layer."""
    from qtool.models import family_for
    from qtool.runner.moe import MIN_EXPERT_TOKENS

    fam = family_for(ckpt.config, strict=False)
    return {
        "n_expert": int(fam.get("num_local_experts", "num_experts", default=0)),
        "top_k": int(fam.get("num_experts_per_tok", default=0)),
        "all_experts": all_experts,
        "min_tokens": MIN_EXPERT_TOKENS,
        "routed": {str(i): c for i, c in sorted(routed.items())},
    }


def coverage(moe: dict[str, Any]) -> dict[str, Any]:
    """Per MoE layer: min / median / max routed tokens and the starved experts (fewer than
    ``min_tokens``: GPTQ rounds those to nearest instead)."""
    layers = []
    for i, counts in moe["routed"].items():
        s = sorted(counts)
        layers.append(
            {
                "layer": int(i),
                "min": s[0],
                "median": s[len(s) // 2],
                "max": s[-1],
                "starved": [(e, c) for e, c in enumerate(counts) if c < moe["min_tokens"]],
            }
        )
    return {**{k: v for k, v in moe.items() if k != "routed"}, "layers": layers}


def _created() -> str | None:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    try:
        t = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
    except (ValueError, OverflowError):
        raise BadInputError(f"SOURCE_DATE_EPOCH={epoch!r}: not a Unix time") from None
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def imatrix_of(cal: CalibrationStats, *, include_output: bool = False) -> Imatrix:
    """The llama.cpp importance matrix of ``cal`` (GGUF tensor names)."""
    m = cal.meta["model"]
    d = cal.meta["dataset"]
    entries = entries_from_stats(
        cal.layers.values(),
        model_type=m["model_type"],
        n_layers=int(m["n_layers"]),
        include_output=include_output and not m.get("tied_embeddings", False),
        n_expert=int((cal.meta.get("moe") or {}).get("n_expert", 0)),
    )
    if not entries:
        raise UnsupportedError(
            f"{m['source']}: none of its layers has a llama.cpp tensor name "
            f"(model type {m['model_type']})"
        )
    return Imatrix(
        entries,
        datasets=[str(d["spec"])],
        chunk_count=int(d["samples"]),
        chunk_size=int(d["seq_len"]),
    )


def _stem(src: str) -> str:
    p = Path(src)
    name = p.name if p.exists() else src.rstrip("/").split("/")[-1]
    return (p.stem if p.suffix in (".gguf", ".safetensors") else name) or "model"


def run_calibrate(
    src: str,
    opts: CalibrateOptions,
    *,
    output: Path | None = None,
    imatrix: Path | None = None,
    imatrix_output: bool = False,
    revision: str | None = None,
    top: int = 10,
    outlier_factor: float = 20.0,
    reporter: Reporter = SILENT,
    resume: Path | None = None,
) -> tuple[dict[str, Any], CalibrationStats]:
    """``qtool calibrate``: samples, statistics, the stats file (``output``, default
    ``./MODEL.calib.safetensors``) and the imatrix (``imatrix``), both written or neither.
    Per-layer results and hidden-state checkpoints go to a work folder beside the stats file
    (``STATS.qtool-calibrate``), removed on success; ``resume`` continues the run it holds.
    Under torchrun every rank calls this; rank 0 writes and returns the full result."""
    from dataclasses import asdict

    from qtool.calibrate.imatrix import save_imatrix
    from qtool.io import check_writable
    from qtool.observers.stats import outlier_rows
    from qtool.observers.statsfile import save_stats
    from qtool.runner import dist

    if top < 0 or outlier_factor <= 1:
        raise BadInputError("--top must be >= 0 and --outlier-factor > 1")
    stats_path = output or Path(f"{_stem(src)}.calib.safetensors")
    world = dist.world()  # torchrun: every rank runs this; rank 0 alone writes
    world.agree(
        dist.software() | {"the options": {**asdict(opts), "imatrix_output": imatrix_output}}
    )

    def writable() -> None:
        check_writable(stats_path)
        if imatrix is not None:
            check_writable(imatrix)
            if imatrix.expanduser().resolve() == stats_path.expanduser().resolve():
                raise BadInputError(f"--imatrix {imatrix}: the same path as the stats file")

    world.on_main(writable)
    t0 = time.perf_counter()
    prep = prepare(src, opts, revision=revision)
    for note in prep.notes:
        reporter.warn(note)
    if opts.hessian:
        sp = prep.spec
        inter = sp.intermediate or 4 * sp.hidden
        per_layer = 2 * sp.hidden**2 + (sp.n_heads * sp.head_dim) ** 2 + inter**2
        size = 4 * per_layer * sp.n_layers
        if size > 2 * 2**30:
            reporter.warn(
                f"--hessian keeps {size / 2**30:.1f} GiB of Σ x xᵀ in memory and in the stats "
                "file (float32, one per distinct input)"
            )
    d = prep.dataset
    reporter.info(
        f"calibrating {prep.ckpt.source}: {d['samples']} samples x {d['seq_len']} tokens of "
        f"{d['spec']} ({d['stream_tokens']:,} tokens, {d['windows_available']} windows; "
        f"tokens sha256 {d['tokens_sha256'][:16]})"
    )
    work_path = resume or stats_path.with_name(stats_path.name + ".qtool-calibrate")
    work = CalibrationWork.open(
        work_path, calibration_identity(prep, opts), resume=resume is not None, world=world
    )
    if resume is None:
        reporter.info(f"checkpoints in {work_path}; if interrupted: --resume {work_path}")
    dist.note_resume(work_path)
    fresh = work.layers_done == 0
    try:
        cal = calibrate(prep, opts, progress=reporter, work=work)
    except PeerError as e:
        raise PeerError(e.message, hint=f"rerun with --resume {work_path}") from e
    except BadInputError:
        if fresh and world.is_main:  # bad input fails the same way again: nothing to resume
            shutil.rmtree(work_path, ignore_errors=True)
        raise
    if not world.is_main:  # rank 0 writes (on resume only it holds the earlier layers)
        return {"rank": world.rank}, cal
    for r in coverage(cal.meta["moe"])["layers"] if cal.meta.get("moe") else []:
        if r["starved"]:
            reporter.warn(
                f"layer {r['layer']}: {len(r['starved'])} experts saw fewer than "
                f"{cal.meta['moe']['min_tokens']} tokens (e.g. expert {r['starved'][0][0]}: "
                f"{r['starved'][0][1]}); more samples or --all-experts give them data"
            )
    im = imatrix_of(cal, include_output=imatrix_output) if imatrix is not None else None
    save_stats(stats_path, cal)
    if im is not None and imatrix is not None:
        try:
            save_imatrix(imatrix, im)
        except BaseException:
            stats_path.unlink(missing_ok=True)  # both outputs or neither
            raise
    shutil.rmtree(work_path, ignore_errors=True)
    reporter.info(f"wrote {stats_path}" + (f" and {imatrix}" if imatrix else ""))
    rows = outlier_rows(cal.layers.values(), factor=outlier_factor, top=top)
    data: dict[str, Any] = {
        "model": prep.ckpt.source,
        "stats_file": str(stats_path),
        "imatrix_file": str(imatrix) if imatrix else None,
        "imatrix_entries": len(im.entries) if im else None,
        "dataset": d,
        "tokens_seen": cal.tokens,
        "linear_layers": len(cal.layers),
        "device": cal.meta["device"],
        "dtype": cal.meta["dtype"],
        "seconds": round(time.perf_counter() - t0, 2),
        **({"processes": world.size} if world.active else {}),
        "outlier_factor": outlier_factor,
        "outliers": rows,
        **({"experts": coverage(cal.meta["moe"])} if cal.meta.get("moe") else {}),
    }
    return data, cal
