"""``calibrate()``: dataset -> samples -> layer-by-layer statistics -> :class:`CalibrationStats`.

Every check that can fail on bad input (dataset, text field, sample count, sequence length,
tokenizer/vocab) runs before the model does, so a bad run stops in seconds and writes nothing.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtool import __version__
from qtool.arch import ModelSpec
from qtool.calibrate.datasets import (
    Samples,
    load_documents,
    load_tokenizer,
    make_samples,
    resolve_dataset,
)
from qtool.calibrate.imatrix import Imatrix, entries_from_stats, gguf_weight_name
from qtool.calibrate.layerwise import DTYPES, Progress, calibrate_layerwise, pick_device
from qtool.calibrate.stats import HIST_BINS
from qtool.calibrate.statsfile import (
    FORMAT,
    VERSION,
    CalibrationStats,
    model_identity,
    sample_weights,
)
from qtool.checkpoint import Checkpoint, open_checkpoint
from qtool.errors import BadInputError, UnsupportedError


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
    dtype: str = "float32"
    hessian: bool = False
    lm_head: bool = True


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
    if opts.dtype not in DTYPES:
        raise BadInputError(f"--dtype {opts.dtype}: use one of {', '.join(DTYPES)}")
    if opts.samples < 1:
        raise BadInputError(f"--samples {opts.samples}: must be at least 1")
    if opts.seq_len < 2:
        raise BadInputError(f"--seq-len {opts.seq_len}: must be at least 2")
    if opts.batch_size < 1:
        raise BadInputError(f"--batch-size {opts.batch_size}: must be at least 1")
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src, revision=revision)
    if ckpt.format != "safetensors":
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


def _has_tokenizer(root: Path) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    return any((root / n).exists() for n in names)


def calibrate(
    prep: Prepared, opts: CalibrateOptions, *, progress: Progress | None = None
) -> CalibrationStats:
    """Run the model layer by layer on the prepared samples and gather the statistics."""
    device = pick_device(opts.device)
    result = calibrate_layerwise(
        prep.ckpt,
        prep.samples.ids,
        batch_size=opts.batch_size,
        device=device,
        dtype=DTYPES[opts.dtype],
        hessian=opts.hessian,
        lm_head=opts.lm_head,
        progress=progress,
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
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {**model_identity(prep.ckpt), "weight_sample_tensors": sample_names},
        "dataset": prep.dataset,
        "tokenizer": prep.tokenizer,
        "tokens_seen": result.tokens,
        "device": result.device,
        "dtype": result.dtype,
        "torch_version": torch.__version__,
        "seconds": round(result.seconds, 3),
        "hist_bins": HIST_BINS,
        "hessian": opts.hessian,
    }
    return CalibrationStats(meta, result.stats, sample, None, gguf_names)


def imatrix_of(cal: CalibrationStats, *, include_output: bool = False) -> Imatrix:
    """The llama.cpp importance matrix of ``cal`` (GGUF tensor names)."""
    m = cal.meta["model"]
    d = cal.meta["dataset"]
    entries = entries_from_stats(
        cal.layers.values(),
        model_type=m["model_type"],
        n_layers=int(m["n_layers"]),
        include_output=include_output and not m.get("tied_embeddings", False),
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
