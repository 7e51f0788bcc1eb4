"""qtool's Python API: the five verbs the CLI is made of, returning result objects.

Each function takes a source (a Hugging Face repo id, a local checkpoint folder, or a ``.gguf``
file) and options, does the work, and returns a result whose ``data`` is exactly what the CLI
prints with ``--json``. Nothing here prints: pass ``on_event`` (a callable receiving one dict
per log line or progress step) or a :class:`qtool.events.Reporter` to follow the work.

    from qtool import api

    res = api.quantize("path/to/model", recipe="recipes/gptq-w4a16.yaml", output="out-gptq")
    bpw = res.outputs[0]["bits_per_weight"]  # the CLI's --json, as a dict

    res = api.quantize("path/to/model", method="gptq", type="Q4_K_M", dataset="canterbury",
                       output="model-q4km.gguf")

Errors are :class:`qtool.errors.QToolError` subclasses with a one-line message (``exit_code`` 2 for
bad input, 1 for runtime failures).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.events import Reporter, as_reporter
from qtool.recipe import Recipe

__all__ = [
    "CalibrateResult",
    "EvalResult",
    "InspectResult",
    "QuantizeResult",
    "Recipe",
    "calibrate",
    "evaluate",
    "export",
    "inspect",
    "load_recipe",
    "quantize",
]

OnEvent = Callable[[dict[str, Any]], None]


@dataclass
class Result:
    """A verb's result: ``data`` is the ``--json`` document."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data


@dataclass
class InspectResult(Result):
    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def formats(self) -> list[dict[str, Any]]:
        return self.data["formats"]


@dataclass
class CalibrateResult(Result):
    stats: Any = field(default=None, repr=False)  # qtool.observers.statsfile.CalibrationStats


@dataclass
class QuantizeResult(Result):
    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.data["outputs"]

    @property
    def recipe(self) -> dict[str, Any]:
        return self.data["recipe"]


@dataclass
class EvalResult(Result):
    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return self.data["artifacts"]


def load_recipe(recipe: Recipe | str | Path | dict[str, Any]) -> Recipe:
    """A :class:`Recipe` from a recipe object, a YAML/JSON file path, or a mapping."""
    from qtool import recipe as rc

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return rc.parse(recipe)
    return rc.load(recipe)


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def inspect(
    src: str,
    *,
    context: int | None = None,
    batch: int = 1,
    cache_dtype: str | None = None,
    gpu_mem: Sequence[float] | None = None,
    lora_rank: int = 16,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> InspectResult:
    """Architecture, parameters, dtypes and the memory footprint in every format, from headers
    alone (no tensor data is read; a Hub id fetches config and safetensors headers only)."""
    from qtool.checkpoint import open_checkpoint
    from qtool.errors import BadInputError
    from qtool.footprint import build_report

    if gpu_mem and any(g <= 1 for g in gpu_mem):
        raise BadInputError(f"--gpu-mem must be more than 1 GiB, got {min(gpu_mem)}")
    ckpt = open_checkpoint(src, revision=revision, allow_pickle=allow_pickle, headers_only=True)
    try:
        report = build_report(
            ckpt,
            context=context,
            batch=batch,
            cache_dtype=cache_dtype,
            gpu_sizes=tuple(gpu_mem) if gpu_mem else (24, 40, 80),
            lora_rank=lora_rank,
        )
    except ValueError as e:
        raise BadInputError(str(e)) from e
    return InspectResult(report.as_dict())


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------


def calibrate(
    src: str,
    *,
    dataset: str = "wikitext2",
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    output: str | Path | None = None,
    imatrix: str | Path | None = None,
    imatrix_output: bool = False,
    text_field: str | None = None,
    dataset_revision: str | None = None,
    tokenizer: str | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    hessian: bool = False,
    all_experts: bool = False,
    max_memory: str | int | None = None,
    max_gpu_memory: str | int | None = None,
    revision: str | None = None,
    top: int = 10,
    outlier_factor: float = 20.0,
    resume: str | Path | None = None,
    reporter: Reporter | None = None,
    on_event: OnEvent | None = None,
) -> CalibrateResult:
    """Activation statistics of every linear layer, layer by layer; writes the stats file
    (``output``) and/or llama.cpp's importance matrix (``imatrix``) when given."""
    from qtool.calibrate.pipeline import CalibrateOptions, run_calibrate
    from qtool.runner.memory import parse_bytes

    opts = CalibrateOptions(
        dataset=dataset,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        text_field=text_field,
        dataset_revision=dataset_revision,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        hessian=hessian,
        all_experts=all_experts,
        max_memory=parse_bytes(max_memory),
        max_gpu_memory=parse_bytes(max_gpu_memory, "--max-gpu-memory"),
    )
    data, stats = run_calibrate(
        src,
        opts,
        output=Path(output) if output is not None else None,
        imatrix=Path(imatrix) if imatrix is not None else None,
        imatrix_output=imatrix_output,
        revision=revision,
        top=top,
        outlier_factor=outlier_factor,
        reporter=as_reporter(reporter, on_event),
        resume=Path(resume).expanduser() if resume is not None else None,
    )
    return CalibrateResult(data, stats)


# --------------------------------------------------------------------------------------------
# quantize / export
# --------------------------------------------------------------------------------------------


def quantize(
    src: str,
    recipe: Recipe | str | Path | dict[str, Any] | None = None,
    *,
    output: str | Path | Sequence[str | Path] | None = None,
    dry_run: bool = False,
    resume: str | Path | bool | None = None,
    device: str = "auto",
    max_memory: str | int | None = None,
    max_gpu_memory: str | int | None = None,
    eval_dataset: str | None = None,
    eval_ctx: int = 256,
    eval_chunks: int = 8,
    revision: str | None = None,
    allow_pickle: bool = False,
    reporter: Reporter | None = None,
    on_event: OnEvent | None = None,
    **options: Any,
) -> QuantizeResult:
    """Run a recipe (an object, a YAML/JSON file or a mapping) on ``src``, or the recipe that
    keyword ``options`` describe (the CLI's flags with underscores: ``method="gptq", bits=4,
    dataset="canterbury"``...). ``output``: the output path (one output) or paths (one per
    recipe output; a recipe output's own ``path`` is used when this is not given).

    ``resume``: continue an interrupted run (a kill, a power loss, or Ctrl-C of a run given
    ``resume``) to the bytes an uninterrupted one writes. ``True``: its checkpoints where they
    are kept by default (GPTQ's ``OUTPUT.qtool-gptq`` folder, each GGUF output's
    ``OUT.qtool-partial``); a path: GPTQ's folder, or for a run without GPTQ one of its GGUF
    outputs' ``OUT.qtool-partial``. A checkpoint of another run is refused; without
    ``resume`` any checkpoint left beside an output is refused (nothing is replaced).
    ``max_memory`` / ``max_gpu_memory`` (bytes, or "16GiB"): the budgets the memory plan fits
    the calibration caches into (host memory, then disk), refused up front when nothing fits."""
    from qtool import recipe as rc

    single = output if isinstance(output, (str, Path)) or output is None else None
    if recipe is None:
        r = rc.from_options(str(single) if single is not None else None, **options)
    else:
        if options:
            from qtool.errors import BadInputError

            raise BadInputError(
                f"{rc.FLAGS.get(next(iter(options)), next(iter(options)))}: the recipe sets the "
                "quantization",
                hint="edit the recipe instead, or pass options without a recipe",
            )
        r = load_recipe(recipe)
    return _run(
        src,
        r,
        output,
        dry_run=dry_run,
        resume=resume,
        device=device,
        max_memory=max_memory,
        max_gpu_memory=max_gpu_memory,
        eval_dataset=eval_dataset,
        eval_ctx=eval_ctx,
        eval_chunks=eval_chunks,
        revision=revision,
        allow_pickle=allow_pickle,
        reporter=reporter,
        on_event=on_event,
    )


def _run(
    src: str,
    r: Recipe,
    output: str | Path | Sequence[str | Path] | None,
    *,
    dry_run: bool,
    resume: str | Path | bool | None,
    device: str = "auto",
    max_memory: str | int | None = None,
    max_gpu_memory: str | int | None = None,
    eval_dataset: str | None = None,
    eval_ctx: int = 256,
    eval_chunks: int = 8,
    revision: str | None,
    allow_pickle: bool,
    reporter: Reporter | None,
    on_event: OnEvent | None,
    export: bool = False,
) -> QuantizeResult:
    from qtool.checkpoint import open_checkpoint
    from qtool.pipeline import RunOptions, run
    from qtool.runner.memory import parse_bytes

    paths = _paths(r, output)
    resuming = resume is not None and resume is not False
    gptq_dir, hint = _resume_target(r, paths, resume, export=export)
    opts = RunOptions(
        dry_run=dry_run,
        resume=gptq_dir,
        resume_all=resuming,
        resume_hint=hint,
        device=device,
        max_memory=parse_bytes(max_memory),
        max_gpu_memory=parse_bytes(max_gpu_memory, "--max-gpu-memory"),
        measure_dataset=eval_dataset,
        measure_ctx=eval_ctx,
        measure_chunks=eval_chunks,
    )
    ckpt = open_checkpoint(src, revision=revision, allow_pickle=allow_pickle)
    data = run(ckpt, r, paths, opts, as_reporter(reporter, on_event))
    return QuantizeResult(data)


def _resume_target(
    r: Recipe, paths: list[Path | None], resume: str | Path | bool | None, *, export: bool
) -> tuple[Path | None, str | None]:
    """(GPTQ's checkpoint folder when ``resume`` names it, how a user continues this run:
    None for "--resume" and the output's own checkpoint folder)."""
    from qtool.errors import BadInputError
    from qtool.formats.gguf import partial_path
    from qtool.pipeline import GPTQ_WORK_SUFFIX

    if export:
        return None, "--resume"
    gguf_paths = [p for p, o in zip(paths, r.outputs, strict=True) if o.format == "gguf" and p]
    if r.method("gptq") is not None:
        first = paths[0]
        default = first.with_name(first.name + GPTQ_WORK_SUFFIX) if first else None
        if isinstance(resume, (str, Path)):
            target = Path(resume).expanduser()
            return target, f"--resume {target}"
        return None, f"--resume {default}"
    partials = [partial_path(p) for p in gguf_paths]
    if isinstance(resume, (str, Path)):
        target = Path(resume).expanduser()
        if not any(target.resolve() == q.resolve() for q in partials):
            raise BadInputError(
                f"--resume {resume}: this run has no GPTQ stage, and that is not the checkpoint "
                "of one of its GGUF outputs"
                + (f" ({', '.join(str(q) for q in partials)})" if partials else ""),
                hint="pass the OUT.qtool-partial folder an interrupted GGUF output left"
                if partials
                else "drop --resume: nothing in this run is resumable",
            )
    return None, None


def _paths(r: Recipe, output: str | Path | Sequence[str | Path] | None) -> list[Path | None]:
    from qtool.errors import BadInputError

    n = len(r.outputs)
    if output is None:
        return [Path(o.path).expanduser() if o.path else None for o in r.outputs]
    if isinstance(output, (str, Path)):
        if n == 1:
            return [Path(output).expanduser()]
        # several outputs: -o is the folder their relative paths are resolved against
        base = Path(output).expanduser()
        missing = [i for i, o in enumerate(r.outputs) if not o.path]
        if missing:
            raise BadInputError(
                f"outputs[{missing[0]}] has no path, and the recipe has {n} outputs",
                hint="give each output a `path:` (resolved against -o when relative)",
            )
        return [base / str(o.path) for o in r.outputs]  # an absolute path stays absolute
    paths = [Path(p).expanduser() for p in output]
    if len(paths) != n:
        raise BadInputError(f"{len(paths)} output paths for a recipe with {n} outputs")
    return list(paths)


def export(
    src: str,
    *,
    format: str = "gguf",
    type: str = "F16",
    output: str | Path | None = None,
    dtype: str = "auto",
    dry_run: bool = False,
    imatrix: str | Path | None = None,
    tensor_type: Sequence[str] | None = None,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    tokenizer_pre: str | None = None,
    resume: bool = False,
    strict: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
    reporter: Reporter | None = None,
    on_event: OnEvent | None = None,
) -> QuantizeResult:
    """Convert ``src`` to GGUF (any type or llama-quantize preset, round-to-nearest) or to a
    dense HF safetensors folder (``format="safetensors"``, e.g. from a GGUF file). A GGUF's
    tokenizer is checked against the source's (``strict``: a difference is an error).

    ``resume``: continue the interrupted GGUF export of this output from its checkpoint
    (``OUT.qtool-partial``, left by a kill, a power loss, or Ctrl-C of a run given ``resume``),
    checked to be this very run's; the file is the one an uninterrupted run writes. Without
    it, such a checkpoint is refused rather than replaced."""
    from qtool import recipe as rc
    from qtool.errors import BadInputError

    if format == "gguf":
        if dtype != "auto":
            raise BadInputError("--dtype applies to --format safetensors")
        out: dict[str, Any] = {"format": "gguf", "type": type, "pure": pure}
        if tensor_type:
            out["tensor_types"] = list(tensor_type)
        for k, v in (
            ("output_tensor_type", output_tensor_type),
            ("token_embedding_type", token_embedding_type),
            ("tokenizer_pre", tokenizer_pre),
            ("imatrix", str(imatrix) if imatrix is not None else None),
        ):
            if v is not None:
                out[k] = v
    elif format == "safetensors":
        if dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise BadInputError(f"--dtype {dtype!r}: use auto, float32, float16 or bfloat16")
        given: dict[str, object] = {
            "--imatrix": imatrix,
            "--tensor-type": tensor_type,
            "--output-tensor-type": output_tensor_type,
            "--token-embedding-type": token_embedding_type,
            "--pure": pure or None,
            "--tokenizer-pre": tokenizer_pre,
            "--resume": resume or None,
        }
        for flag, value in given.items():
            if value:
                raise BadInputError(f"{flag} applies to --format gguf")
        out = {"format": "safetensors", "dtype": dtype}
    else:
        raise BadInputError(f"--format {format!r}: export writes gguf or safetensors")
    recipe = rc.parse(
        {"stages": [], "outputs": [out], **({"strict": True} if strict else {})}, where="export"
    )
    return _run(
        src,
        recipe,
        output,
        dry_run=dry_run,
        resume=True if resume else None,
        revision=revision,
        allow_pickle=allow_pickle,
        reporter=reporter,
        on_event=on_event,
        export=True,
    )


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def evaluate(
    artifacts: Sequence[str],
    *,
    base: str,
    dataset: str,
    ctx: int = 512,
    chunks: int | None = None,
    scoring: str = "full",
    backend: str = "torch",
    dtype: str = "float32",
    device: str = "auto",
    threads: int | None = None,
    resume: str | Path | None = None,
    reporter: Reporter | None = None,
    on_event: OnEvent | None = None,
) -> EvalResult:
    """Perplexity, KL divergence and top-1 agreement of each artifact against ``base`` on the
    text ``dataset``, window by window.

    ``resume``: a state file, saved as windows complete (and on Ctrl-C or an error): an
    interrupted evaluation given the same file and settings skips the windows done and gives
    exactly the numbers of an uninterrupted one; a file of other settings is refused; it is
    deleted when the evaluation completes."""
    from qtool.evaluate.runner import EvalSettings, run_eval

    data = run_eval(
        EvalSettings(
            artifacts=list(artifacts),
            base=base,
            dataset=dataset,
            ctx=ctx,
            chunks=chunks,
            scoring=scoring,
            backend=backend,
            dtype=dtype,
            device=device,
            threads=threads,
            resume=resume,
        ),
        reporter=as_reporter(reporter, on_event),
    )
    return EvalResult(data)
