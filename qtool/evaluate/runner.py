"""``qtool eval``'s engine: base and artifacts run window by window in one pass.

For every window the base model runs once and each artifact once; the metrics of the window are
accumulated slice by slice of positions, then the logits are dropped. Memory is one window of
hidden states per model plus one slice of logits, whatever the length of the text.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError
from qtool.evaluate.data import (
    adds_bos,
    make_windows,
    resolve_dataset,
    scored_positions,
    tokenize,
)
from qtool.evaluate.loaders import (
    BACKENDS,
    EvalModel,
    check_context,
    hf_config,
    load_model,
    load_tokenizer,
    open_source,
    resolve_device,
    same_source,
    torch_dtype,
)
from qtool.evaluate.metrics import CompareStats, PerplexityStats, base_slice, update_compare
from qtool.events import SILENT, Reporter

SCORINGS = ("full", "second-half")
# One slice of float32 logits from the output head: 32 Mi elements (128 MiB).
HEAD_ELEMS = 1 << 25
# One slice of the metric arrays: 4 Mi elements (16 MiB per float32 temporary).
METRIC_ELEMS = 1 << 22


@dataclass
class EvalSettings:
    artifacts: list[str]
    base: str
    dataset: str
    ctx: int
    chunks: int | None = None
    scoring: str = "full"
    backend: str = "torch"
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    resume: str | Path | None = None  # the resume file (qtool.evaluate.state)


@dataclass
class _Timer:
    seconds: float = 0.0
    start: float = field(default=0.0, repr=False)

    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self.start


def _validate(s: EvalSettings) -> None:
    if not s.artifacts:
        raise BadInputError("give at least one ARTIFACT to evaluate against --base")
    if s.ctx < 2:
        raise BadInputError(f"--ctx {s.ctx}: a window needs at least 2 tokens")
    if s.scoring == "second-half" and s.ctx < 4:
        raise BadInputError(f"--ctx {s.ctx}: second-half scoring needs --ctx 4 or more")
    if s.chunks is not None and s.chunks < 1:
        raise BadInputError(f"--chunks {s.chunks}: must be 1 or more")
    if s.scoring not in SCORINGS:
        raise BadInputError(f"--scoring {s.scoring}: choose one of {', '.join(SCORINGS)}")
    if s.backend not in BACKENDS:
        raise BadInputError(f"--backend {s.backend}: choose one of {', '.join(BACKENDS)}")


def _normalise_token(t: str | None) -> str:
    # SentencePiece vocabularies: llama.cpp's GGUF keeps real spaces in a few whitespace
    # tokens where the HF tokenizer writes U+2581 ("▁"); both mean the same piece.
    return (t or "").replace("\u2581", " ")


def _vocab_of(ckpt: Checkpoint) -> int | None:
    if ckpt.format == "gguf":
        t = ckpt.tensors.get("token_embd.weight")
        return t.shape[0] if t is not None else ckpt.config.get("vocab_size")
    cfg = {**ckpt.config, **(ckpt.config.get("text_config") or {})}
    v = cfg.get("vocab_size")
    return int(v) if v is not None else None


def check_vocabulary(
    art: Checkpoint, base_vocab: int, base_tokens: list[str], used: np.ndarray
) -> int:
    """Refuse an artifact whose vocabulary is not the base's. Returns the number of token
    strings that differ outside the evaluated text (worth a warning, not an error)."""
    v = _vocab_of(art)
    if v is not None and v != base_vocab:
        raise BadInputError(
            f"{art.source}: vocabulary of {v} tokens, the base model has {base_vocab}: "
            "KL divergence needs the same tokenizer",
            hint="evaluate artifacts made from the --base model",
        )
    tokens: list[str] | None = None
    if art.format == "gguf":
        raw = art.gguf_metadata.get("tokenizer.ggml.tokens")
        tokens = list(raw) if raw is not None else None
    elif any((art.root / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tok = load_tokenizer(art)
        tokens = tok.convert_ids_to_tokens(list(range(min(len(tok), base_vocab))))
    if tokens is None:
        return 0  # no tokenizer shipped: the vocabulary size is all there is to compare
    n = min(len(tokens), len(base_tokens))
    differ = [
        i for i in range(n) if _normalise_token(tokens[i]) != _normalise_token(base_tokens[i])
    ]
    if len(tokens) != len(base_tokens) and len(tokens) < int(used.max()) + 1:
        raise BadInputError(
            f"{art.source}: its tokenizer has {len(tokens)} tokens, the base's {len(base_tokens)}",
            hint="evaluate artifacts made from the --base model",
        )
    bad = np.intersect1d(np.asarray(differ, dtype=np.int64), used)
    if bad.size:
        i = int(bad[0])
        raise BadInputError(
            f"{art.source}: a different tokenizer from the base: token {i} is "
            f"{tokens[i]!r} there, {base_tokens[i]!r} in the base ({bad.size} of the text's "
            "tokens differ)",
            hint="evaluate artifacts made from the --base model",
        )
    return len(differ)


def run_eval(s: EvalSettings, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Evaluate ``s.artifacts`` against ``s.base`` on ``s.dataset``; returns the report dict."""
    import torch

    out = reporter
    _validate(s)
    dtype = torch_dtype(s.dtype)
    device = resolve_device(s.device)
    if s.threads is not None:
        if s.threads < 1:
            raise BadInputError(f"--threads {s.threads}: must be 1 or more")
        torch.set_num_threads(s.threads)
    t_start = time.perf_counter()

    # Cheap checks first: the text, the base's tokenizer and context, every artifact's header.
    dataset = resolve_dataset(s.dataset)
    base_ckpt = open_source(s.base)
    base_cfg = {**base_ckpt.config, **(base_ckpt.config.get("text_config") or {})}
    check_context(s.base, s.ctx, base_cfg.get("max_position_embeddings"))
    out.info(f"tokenizing {dataset.label} with the base tokenizer")
    tokenizer = load_tokenizer(base_ckpt)
    tokens = tokenize(tokenizer, dataset.text)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    windows, available = make_windows(tokens, s.ctx, s.chunks, bos)
    if s.chunks is not None and s.chunks > available:
        out.warn(f"--chunks {s.chunks}: the text holds {available} windows of {s.ctx}; using all")
    used = np.unique(windows)
    base_vocab = _vocab_of(base_ckpt) or len(tokenizer)
    base_tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), base_vocab))))
    art_ckpts: list[Checkpoint] = []
    for src in s.artifacts:
        ckpt = base_ckpt if src == s.base else open_source(src)
        cfg = {**ckpt.config, **(ckpt.config.get("text_config") or {})}
        check_context(src, s.ctx, cfg.get("max_position_embeddings"))
        differ = check_vocabulary(ckpt, base_vocab, base_tokens, used)
        if differ:
            out.warn(f"{src}: {differ} token strings differ from the base's (none in the text)")
        art_ckpts.append(ckpt)

    # The resume file, checked against these settings before any model is loaded.
    resume = None
    if s.resume is not None:
        from qtool.evaluate.state import EvalCheckpoint

        identity = _identity(s, base_ckpt, art_ckpts, dataset.text, windows, bos, device)
        resume = EvalCheckpoint.open(s.resume, identity)

    # Models: the base, then each artifact (one model for sources that are the same files).
    base_hf_cfg = hf_config(base_ckpt)
    task = out.task("loading models", 1 + len(art_ckpts))

    def load(ckpt: Checkpoint, role: str) -> EvalModel:
        return load_model(
            ckpt,
            role=role,
            dtype=dtype,
            device=device,
            backend=s.backend,
            ctx=s.ctx,
            base_hf_config=base_hf_cfg,
            threads=s.threads,
            reporter=out,
        )

    base = load(base_ckpt, "base")
    task.advance()
    models: list[EvalModel] = []
    for ckpt in art_ckpts:
        twin = next(
            (m for m in [base, *models] if same_source(m.ckpt, ckpt) and _same_backend(m, s)),
            None,
        )
        if twin is not None:
            models.append(twin)
        else:
            models.append(load(ckpt, "artifact"))
        task.advance()
    out.done(task)
    for m in models:
        if m.vocab != base.vocab:
            raise BadInputError(
                f"{m.label}: its output has {m.vocab} logits, the base's {base.vocab}",
                hint="evaluate artifacts made from the --base model",
            )
    load_seconds = time.perf_counter() - t_start

    base_params = _parameter_count(base)
    first, last = scored_positions(s.ctx, s.scoring)
    vocab = base.vocab
    head_rows = max(1, HEAD_ELEMS // vocab)
    metric_rows = max(1, METRIC_ELEMS // vocab)
    base_stats = PerplexityStats()
    stats = [CompareStats() for _ in models]
    unique = {id(m): m for m in [base, *models]}
    timers = {k: _Timer() for k in unique}
    n = len(windows)
    start, seconds_before = 0, 0.0
    if resume is not None and resume.windows_done:
        start = resume.windows_done
        base_stats, stats, forward, seconds_before = resume.restore()
        for timer, sec in zip(timers.values(), forward, strict=True):
            timer.seconds = sec
        out.info(f"resuming at window {start + 1} of {n} ({start} done, kept in {resume.path})")
    out.info(
        f"evaluating {len(models)} artifact(s) on {n} windows of {s.ctx} tokens "
        f"({s.scoring} scoring, {n * (last - first)} tokens scored) on {device}"
    )
    t_loop = time.perf_counter()
    task = out.task("eval", n * len(unique))
    task.advance(start * len(unique))
    try:
        for w in range(start, n):
            ids = windows[w]
            logits = {}
            for k, m in unique.items():
                with timers[k]:
                    logits[k] = m.runner.run(ids)
                task.advance()
            targets_all = torch.as_tensor(ids, dtype=torch.long)
            for a in range(first, last, head_rows):
                b = min(a + head_rows, last)
                block = {}
                for k in unique:
                    with timers[k]:
                        block[k] = logits[k].rows(a, b)
                for c in range(0, b - a, metric_rows):
                    d = min(c + metric_rows, b - a)
                    bl = block[id(base)][c:d]
                    y = targets_all[a + c + 1 : a + d + 1].to(bl.device)
                    bs = base_slice(base_stats, bl, y)
                    for st, m in zip(stats, models, strict=True):
                        update_compare(st, bs, block[id(m)][c:d].to(bl.device), y)
                    del bs
                del block
            del logits
            if resume is not None:
                resume.mark(
                    w + 1,
                    base_stats,
                    stats,
                    [timer.seconds for timer in timers.values()],
                    seconds_before + time.perf_counter() - t_loop,
                )
    except BaseException as e:
        if resume is not None:  # the last complete window, for the next --resume
            try:
                resume.save()
            except Exception:  # noqa: BLE001 - the last save stands; the first error is the news
                pass
            if isinstance(e, KeyboardInterrupt) and resume.windows_done:
                out.warn(
                    f"{resume.windows_done} of {n} windows kept in {resume.path}; "
                    "the same command continues"
                )
        raise
    out.done(task)
    eval_seconds = seconds_before + time.perf_counter() - t_loop

    text_tokens = n * s.ctx
    base_row = _model_row(base, base_params)
    base_row.update(
        ppl=base_stats.ppl,
        ppl_stderr=base_stats.ppl_stderr,
        forward_seconds=timers[id(base)].seconds,
        tokens_per_second=_rate(text_tokens, timers[id(base)].seconds),
    )
    rows = []
    for src, m, st in zip(s.artifacts, models, stats, strict=True):
        row = _model_row(m, base_params)
        row.update(st.summary())
        row["source"] = src
        row["delta_ppl"] = row["ppl"] - base_stats.ppl
        row["forward_seconds"] = timers[id(m)].seconds
        row["tokens_per_second"] = _rate(text_tokens, timers[id(m)].seconds)
        rows.append(row)
    result = {
        "settings": {
            "base": s.base,
            "dataset": dataset.label,
            "dataset_files": [str(f) for f in dataset.files],
            "ctx": s.ctx,
            "chunks": n,
            "chunks_available": available,
            "scoring": s.scoring,
            "bos": bos is not None,
            "backend": s.backend,
            "dtype": s.dtype,
            "device": device,
            "threads": s.threads or torch.get_num_threads(),
        },
        "tokens": {"text": len(tokens), "evaluated": text_tokens, "scored": n * (last - first)},
        "base": base_row,
        "artifacts": rows,
        "timing": {
            "load_seconds": load_seconds,
            "eval_seconds": eval_seconds,
            "tokens_per_second": _rate(text_tokens, eval_seconds),
        },
    }
    if resume is not None:
        resume.remove()  # complete: nothing is left to resume
    return result


def _identity(
    s: EvalSettings,
    base: Checkpoint,
    artifacts: list[Checkpoint],
    text: str,
    windows: np.ndarray,
    bos: int | None,
    device: str,
) -> dict[str, Any]:
    """What makes two evaluations the same one, for ``--resume``: the models and their files,
    the text and the windows cut from it, every setting that changes a number, the versions."""
    import torch

    from qtool import __version__
    from qtool.io import file_identity

    def model(src: str, ckpt: Checkpoint) -> dict[str, Any]:
        files = sorted(ckpt.files, key=lambda f: Path(f).name)
        return {"source": src, "files": [file_identity(f) for f in files]}

    return {
        "base": model(s.base, base),
        "artifacts": [model(a, c) for a, c in zip(s.artifacts, artifacts, strict=True)],
        "dataset": {
            "spec": s.dataset,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        },
        "windows": {
            "shape": list(windows.shape),
            "bos": bos,
            "sha256": hashlib.sha256(np.ascontiguousarray(windows, np.int64).tobytes()).hexdigest(),
        },
        "settings": {
            "ctx": s.ctx,
            "chunks": s.chunks,
            "scoring": s.scoring,
            "backend": s.backend,
            "dtype": s.dtype,
            "device": device,
            "threads": torch.get_num_threads(),
        },
        "versions": {"qtool": __version__, "torch": torch.__version__},
    }


def _same_backend(m: EvalModel, s: EvalSettings) -> bool:
    wanted = "llama.cpp" if (s.backend == "llama.cpp" and m.ckpt.format == "gguf") else "torch"
    return m.backend == wanted


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else math.nan


def _parameter_count(base: EvalModel) -> int:
    """Weights of the base model, each counted once (a tied output head is the embedding)."""
    model = getattr(base.runner, "model", None)
    if model is not None:
        return int(sum(p.numel() for p in model.parameters()))
    return int(sum(t.numel for t in base.ckpt.tensors.values()))


def _model_row(m: EvalModel, base_params: int) -> dict[str, Any]:
    return {
        "source": m.label,
        "kind": m.kind,
        "backend": m.backend,
        "size_bytes": m.ckpt.bytes_on_disk,
        "weight_bytes": m.weight_bytes,
        # llama.cpp's "BPW": tensor bytes x 8 over the model's parameters.
        "bits_per_weight": 8 * m.weight_bytes / base_params if base_params else math.nan,
    }
