"""The one quantization pipeline behind ``qtool quantize``, ``qtool export`` and the API.

Reads top to bottom:

1. **plan** (headers only): for every output, every tensor's grid (the GGUF type llama-quantize
   would choose, the integer scheme of a GPTQ / compressed-tensors folder, ternary for BitNet) and
   the method that picks its codes (the first method stage whose patterns match it; RTN when
   none does); everything that cannot work is refused here, before any data is read. A dry run
   stops after this step.
2. **statistics** when a stage needs them (SmoothQuant, static activation scales, RTN's
   importance-weighted clipping, a GGUF ``imatrix: calibration``): one calibration pass, or a
   stats file from ``qtool calibrate``.
3. **transforms**: SmoothQuant factors folded into the norms.
4. **GPTQ**, when any output asks for it: one layer-by-layer pass over the calibration samples
   quantizes each decoder linear on every grid the outputs need (resumable).
5. **write** each output: tensors stream one at a time; RTN and BitNet quantize as they write.
6. **report**: bytes, bits per weight, per-linear errors, the footprint, measured quality.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.checkpoint import Checkpoint
from qtool.errors import BadInputError, PeerError, UnsupportedError
from qtool.events import SILENT, Reporter
from qtool.models import Family, family_for
from qtool.recipe import (
    BitNetOutput,
    DenseOutput,
    GGUFOutput,
    GPTQStage,
    IntOutput,
    MXFP4Output,
    Recipe,
    RTNStage,
    matches,
)

GPTQ_FORMAT_BITS = (2, 3, 4, 8)
GPTQ_WORK_SUFFIX = ".qtool-gptq"  # GPTQ's checkpoint folder beside the first output


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """One tensor of one output: its name there, grid and method (None: stored as it is)."""

    name: str
    hf_name: str | None
    shape: tuple[int, ...]
    grid: str | None
    method: str | None
    nbytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "method": self.method,
            "grid": self.grid,
            "bytes": self.nbytes,
        }


@dataclass
class OutputPlan:
    index: int
    spec: Any  # a recipe output
    path: Path | None
    entries: list[TensorPlan]
    grids: dict[str, Any] = field(default_factory=dict)  # HF module -> Grid (quantized ones)
    methods: dict[str, str] = field(default_factory=dict)  # HF module -> method
    gguf: Any = None  # formats.gguf.GGUFPlan

    @property
    def format(self) -> str:
        return str(self.spec.format)

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for e in self.entries:
            k = e.grid or "as stored"
            counts[k] = counts.get(k, 0) + 1
        return {
            "format": self.format,
            "path": str(self.path) if self.path else None,
            "tensor_bytes": self.tensor_bytes,
            "grids": counts,
            "tensors": [e.as_dict() for e in self.entries],
        }


@dataclass
class Plan:
    source: Checkpoint
    family: Family
    recipe: Recipe
    outputs: list[OutputPlan]
    warnings: list[str] = field(default_factory=list)

    def gptq_jobs(self) -> dict[str, list[Any]]:
        """HF module -> the grids GPTQ quantizes it on (deduplicated across outputs)."""
        jobs: dict[str, dict[str, Any]] = {}
        for o in self.outputs:
            for module, method in o.methods.items():
                if method == "gptq":
                    g = o.grids[module]
                    jobs.setdefault(module, {})[g.key] = g
        return {m: list(gs.values()) for m, gs in sorted(jobs.items())}

    def _imatrix_covers(self, e: TensorPlan) -> bool:
        """A decoder linear, or a merged MoE expert tensor (``ffn_*_exps``, one imatrix row per
        expert): what llama.cpp's importance matrix weights."""
        if e.hf_name is not None:
            return self.family.is_linear(e.hf_name, e.shape)
        return e.name.startswith("blk.") and "_exps." in e.name

    @property
    def needs_stats(self) -> bool:
        r = self.recipe
        if r.smoothquant is not None:
            return True
        for o in self.outputs:
            spec = o.spec
            if isinstance(spec, GGUFOutput) and spec.imatrix == "calibration":
                # llama.cpp's imatrix covers the decoder linears; those GPTQ quantizes use their
                # own Hessians (whose diagonal is the imatrix), so only RTN'd ones need a pass
                if any(e.method == "rtn" and self._imatrix_covers(e) for e in o.entries):
                    return True
            if isinstance(spec, IntOutput) and spec.activations and not spec.activations.dynamic:
                if any(m != "gptq" for m in o.methods.values()):
                    return True
            if (
                any(
                    m == "rtn" and _stage_for(r, "rtn").clip == "mse" and o.grids[n].kind == "int"
                    for n, m in o.methods.items()
                )
                and r.calibration is not None
            ):
                return True
        return False


def _stage_for(recipe: Recipe, method: str) -> Any:
    return recipe.method(method) or (RTNStage(method="rtn") if method == "rtn" else None)


def open_family(ckpt: Checkpoint) -> Family:
    return family_for(ckpt.config, ckpt.root)


def make_plan(
    ckpt: Checkpoint, recipe: Recipe, paths: list[Path | None], *, family: Family | None = None
) -> Plan:
    """Every output's tensors with their grid, method and bytes, from headers alone; every
    combination that cannot be written is refused here."""
    family = family or open_family(ckpt)
    plan = Plan(ckpt, family, recipe, [])
    for i, (spec, path) in enumerate(zip(recipe.outputs, paths, strict=True)):
        allowed = family.safetensors_outputs
        if not isinstance(spec, GGUFOutput) and allowed is not None and spec.format not in allowed:
            raise UnsupportedError(
                f"{family.model_type}: --format {spec.format} is not written for this "
                f"architecture; it is written as GGUF or {', '.join(allowed)}",
                hint="use --type (a GGUF type or preset) or --format " + allowed[0],
            )
        if isinstance(spec, MXFP4Output):
            out = _plan_mxfp4(ckpt, family, recipe, spec, i, path)
        elif isinstance(spec, GGUFOutput):
            out = _plan_gguf(ckpt, family, recipe, spec, i, path)
        elif isinstance(spec, IntOutput):
            out = _plan_int(ckpt, family, recipe, spec, i, path)
        elif isinstance(spec, BitNetOutput):
            out = _plan_bitnet(ckpt, family, recipe, spec, i, path)
        else:
            out = _plan_dense(ckpt, family, spec, i, path)
        plan.outputs.append(out)
    _check_rules(plan)
    _check_needs(plan)
    return plan


def _assign(recipe: Recipe, family: Family, hf_name: str, gguf_name: str | None, grid: Any) -> str:
    """The method for one quantized tensor: the first method stage whose patterns match it and
    that can work on it (GPTQ and BitNet: decoder linears; BitNet: ternary grids); RTN else."""
    module = hf_name.removesuffix(".weight")
    names = [n for n in (module, hf_name, gguf_name) if n]
    for st in recipe.methods:
        if not any(matches(p, *names) for p in st.include):
            continue
        if any(matches(p, *names) for p in st.exclude):
            continue
        if st.method in ("gptq", "bitnet") and not family.is_linear(hf_name, (1, 1)):
            continue
        if st.method == "gptq" and not getattr(grid, "has_codes", True):
            continue  # no integer grid under the bytes (MXFP4's E2M1 values): RTN
        if st.method == "bitnet" and not (
            grid.kind in ("ternary", "binary") or grid.key in ("TQ1_0", "TQ2_0")
        ):
            continue
        return st.method
    return "rtn"


def _plan_gguf(
    ckpt: Checkpoint, family: Family, recipe: Recipe, spec: GGUFOutput, i: int, path: Path | None
) -> OutputPlan:
    from qtool.formats.gguf import make_plan as gguf_plan
    from qtool.grids.gguf import FLOAT_TYPES, GGUFGrid

    if ckpt.format == "safetensors":
        family.check_gguf()
    gp = gguf_plan(
        ckpt,
        family,
        spec.type,
        overrides=spec.tensor_types,
        output_type=spec.output_tensor_type,
        token_embedding_type=spec.token_embedding_type,
        pure=spec.pure,
        has_imatrix=spec.imatrix is not None,
    )
    out = OutputPlan(i, spec, path, [], gguf=gp)
    hf_of = _hf_names_of_gguf(ckpt, family) if ckpt.format == "gguf" else {}
    for e in gp.entries:
        hf = e.hf_name if ckpt.format != "gguf" else hf_of.get(e.name)
        method: str | None = None
        grid_key: str | None = e.qtype
        quantized = e.qtype not in FLOAT_TYPES
        if quantized and hf is not None:
            grid = GGUFGrid(e.qtype)
            method = _assign(recipe, family, hf, e.name, grid)
            module = hf.removesuffix(".weight")
            if method != "rtn" or ckpt.format == "gguf":
                out.grids[module] = grid
                out.methods[module] = method
        elif quantized and _merged_gptq(recipe, family, e, ckpt.format):
            method = "gptq"  # MoE experts: GPTQ per expert, stacked into the merged tensor
            for s in e.tensor.experts or e.tensor.sources:
                out.grids[s.removesuffix(".weight")] = GGUFGrid(e.qtype)
                out.methods[s.removesuffix(".weight")] = "gptq"
        elif quantized and e.tensor.encoded_type == e.qtype:
            method = None  # the source's own blocks, carried over (gpt-oss's MXFP4 experts)
        elif quantized:
            method = "rtn"
        elif ckpt.format == "gguf" and e.source_type == e.qtype:
            grid_key = None  # copied as stored (norms, float factors)
        out.entries.append(TensorPlan(e.name, hf, e.shape, grid_key, method, e.nbytes))
    return out


def _merged_gptq(recipe: Recipe, family: Family, e: Any, fmt: str) -> bool:
    """Whether a merged GGUF tensor (MoE experts) is GPTQ'd source by source."""
    from qtool.grids.gguf import GGUFGrid

    srcs = e.tensor.experts or e.tensor.sources
    if fmt == "gguf" or len(srcs) < 2 or e.tensor.hf_name is not None:
        return False
    grid = GGUFGrid(e.qtype)
    return all(_assign(recipe, family, s, e.name, grid) == "gptq" for s in srcs)


def _hf_names_of_gguf(ckpt: Checkpoint, family: Family) -> dict[str, str]:
    """{GGUF name: HF name} of a GGUF source, from the family's names for the architecture's
    own HF tensor names (a meta-device model of the config: no weights)."""
    from qtool.models.gguf_view import hf_names_for

    return hf_names_for(ckpt, family)


def _int_grid(spec: IntOutput, clip: str) -> Any:
    from qtool.grids.affine import Clip, QuantScheme

    gran: Any = spec.resolved_granularity
    return QuantScheme(
        bits=spec.bits,
        sym=spec.sym,
        granularity=gran,
        group_size=spec.group_size if gran == "group" else 128,
        restricted=spec.restricted,
        clip=Clip.parse(clip),
        min_zero=1 if spec.format == "gptq" and not spec.sym else 0,
    )


def _plan_int(
    ckpt: Checkpoint, family: Family, recipe: Recipe, spec: IntOutput, i: int, path: Path | None
) -> OutputPlan:
    fmt = spec.format
    if spec.activations is not None:
        if spec.bits != 8 or spec.resolved_granularity != "channel" or not spec.sym:
            raise BadInputError(
                "W8A8 stores int8 weights per output channel, symmetric",
                hint="use --bits 8 --group-size -1 with --act-bits 8",
            )
        if fmt != "compressed-tensors":
            raise BadInputError(
                "8-bit activations are written in the compressed-tensors int-quantized layout",
                hint="use --format compressed-tensors",
            )
    if fmt == "gptq" and spec.bits not in GPTQ_FORMAT_BITS:
        raise BadInputError(
            f"the GPTQ format stores 2, 3, 4 or 8 bits, not {spec.bits}",
            hint="use --format compressed-tensors",
        )
    _check_float_source(ckpt)
    out = OutputPlan(i, spec, path, [])
    ragged: list[tuple[str, int]] = []
    for name, info in ckpt.tensors.items():
        shape = tuple(info.shape)
        if not family.is_linear(name, shape):
            out.entries.append(TensorPlan(name, name, shape, None, None, info.nbytes))
            continue
        module = name.removesuffix(".weight")
        probe = _int_grid(spec, "none")
        method = _assign(recipe, family, name, family.gguf_name(name), probe)
        stage = _stage_for(recipe, method)
        grid = _int_grid(spec, getattr(stage, "clip", "none") if stage else "none")
        grid.check(name, shape)
        if grid.ragged(shape[1]):
            ragged.append((name, shape[1]))
        out.grids[module] = grid
        out.methods[module] = method
        out.entries.append(TensorPlan(name, name, shape, grid.key, method, grid.nbytes(shape)))
    if ragged:
        n, cols = ragged[0]
        g = spec.group_size
        if fmt != "gptq":
            raise BadInputError(
                f"{n}: --group-size {g} does not divide its {cols} input columns, and "
                f"{fmt} needs whole groups",
                hint=f"use a group size dividing every input (e.g. -g "
                f"{_divisor([int(s[1]) for s in _linear_shapes(ckpt, family)])}), "
                "or --format gptq, which stores a shorter last group",
            )
        out_warn = (
            f"--group-size {g} does not divide the input of {len(ragged)} linears (e.g. {n}: "
            f"{cols} columns): their last group holds {cols % g} columns. The GPTQ format "
            "stores that (as AutoGPTQ writes it); vLLM's GPTQ kernels need whole groups"
        )
        out.spec = spec  # unchanged; the warning is reported by the plan
        setattr(out, "warning", out_warn)  # noqa: B010
    if not out.grids:
        raise UnsupportedError(f"{ckpt.source}: no decoder-layer linear weights to quantize")
    return out


def _linear_shapes(ckpt: Checkpoint, family: Family) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for n, t in ckpt.tensors.items() if family.is_linear(n, t.shape)]


def _divisor(cols: list[int]) -> int:
    """The largest power-of-two group size (<= 128) dividing every linear's input."""
    g = 128
    while g > 1 and any(c % g for c in cols):
        g //= 2
    return g


def _check_float_source(ckpt: Checkpoint) -> None:
    for name, info in ckpt.tensors.items():
        if not str(info.dtype).startswith(("F", "BF")):
            raise UnsupportedError(
                f"{ckpt.source}: {name} is {info.dtype}: the checkpoint is already quantized",
                hint="quantize the original float checkpoint",
            )
    if "quantization_config" in ckpt.config:
        raise UnsupportedError(
            f"{ckpt.source}: the checkpoint is already quantized (quantization_config)",
            hint="quantize the original float checkpoint",
        )


def _plan_bitnet(
    ckpt: Checkpoint,
    family: Family,
    recipe: Recipe,
    spec: BitNetOutput,
    i: int,
    path: Path | None,
) -> OutputPlan:
    from qtool.formats.bitnet import check
    from qtool.grids.ternary import BinaryGrid, TernaryGrid

    _check_float_source(ckpt)
    grid = TernaryGrid() if spec.variant == "ternary" else BinaryGrid()
    out = OutputPlan(i, spec, path, [])
    for name, info in ckpt.tensors.items():
        shape = tuple(info.shape)
        if not family.is_linear(name, shape):
            out.entries.append(TensorPlan(name, name, shape, None, None, info.nbytes))
            continue
        module = name.removesuffix(".weight")
        method = _assign(recipe, family, name, family.gguf_name(name), grid)
        out.grids[module] = grid
        out.methods[module] = method
        out.entries.append(TensorPlan(name, name, shape, grid.key, method, grid.nbytes(shape)))
    check(ckpt, list(out.grids), spec.variant)
    return out


def _plan_mxfp4(
    ckpt: Checkpoint, family: Family, recipe: Recipe, spec: MXFP4Output, i: int, path: Path | None
) -> OutputPlan:
    """Every expert linear on MXFP4's table grid (RTN: llama.cpp's rounding; GPTQ: codes chosen
    on the same exponents), the fused tensors written back in transformers' MXFP4 layout."""
    from qtool.grids.gguf import GGUFGrid

    fused_of = getattr(family, "fused_experts", None)
    if fused_of is None:
        raise UnsupportedError(
            f"{family.model_type}: the mxfp4 format holds gpt-oss's fused MoE experts "
            "(transformers' Mxfp4 layout)",
            hint="use --format gptq or compressed-tensors, or a GGUF type (--type MXFP4_MOE)",
        )
    if getattr(family, "mxfp4", False):
        raise BadInputError(
            f"{ckpt.source}: its experts are MXFP4 already",
            hint="quantize the float (bf16) checkpoint, or write GGUF (--type MXFP4_MOE keeps "
            "these experts' bytes)",
        )
    _check_float_source(ckpt)
    grid = GGUFGrid("MXFP4")
    fused = {f.name: f for f in fused_of(ckpt.tensors)}
    if not fused:
        raise UnsupportedError(f"{ckpt.source}: no fused expert tensors to quantize")
    out = OutputPlan(i, spec, path, [])
    for name, info in ckpt.tensors.items():
        f = fused.get(name)
        if f is None:
            out.entries.append(TensorPlan(name, name, tuple(info.shape), None, None, info.nbytes))
            continue
        grid.check(name, (f.rows, f.cols))
        methods = set()
        for e in range(f.n_expert):
            for module in f.modules(e):
                w = module + ".weight"
                method = _assign(recipe, family, w, family.gguf_name(w), grid)
                out.grids[module], out.methods[module] = grid, method
                methods.add(method)
        method = methods.pop() if len(methods) == 1 else "mixed"
        nb = f.cols // 32
        base = f"{f.prefix}.{f.proj}"
        out.entries.append(
            TensorPlan(
                base + "_blocks", name, (f.n_expert, f.rows, nb, 16), grid.key, method,
                f.n_expert * f.rows * nb * 16,
            )
        )  # fmt: skip
        out.entries.append(
            TensorPlan(
                base + "_scales", name, (f.n_expert, f.rows, nb), grid.key, method,
                f.n_expert * f.rows * nb,
            )
        )  # fmt: skip
    return out


def _plan_dense(
    ckpt: Checkpoint, family: Family, spec: DenseOutput, i: int, path: Path | None
) -> OutputPlan:
    out = OutputPlan(i, spec, path, [])
    if ckpt.format != "safetensors":
        for name, info in ckpt.tensors.items():
            out.entries.append(TensorPlan(name, name, tuple(info.shape), None, None, info.nbytes))
        return out
    for v in family.float_tensors(ckpt.tensors, ckpt.read):  # decoded experts: bf16
        stored = ckpt.tensors.get(v.name)
        nbytes = stored.nbytes if stored is not None else 2 * math.prod(v.shape)
        out.entries.append(TensorPlan(v.name, v.name, v.shape, None, None, nbytes))
    return out


def _check_rules(plan: Plan) -> None:
    """A pattern that matches no tensor: a warning (an error with ``strict``)."""
    names: list[list[str]] = []
    for n in plan.source.tensors:
        names.append([n.removesuffix(".weight"), n, plan.family.gguf_name(n) or ""])
    gguf_names = [e.name for o in plan.outputs if o.gguf is not None for e in o.gguf.entries]
    problems = []
    for i, st in enumerate(plan.recipe.stages):
        for key in ("include", "exclude"):
            for p in getattr(st, key, []):
                if p != "*" and not any(matches(p, *ns) for ns in names):
                    problems.append(f"stages[{i}].{key} {p!r} matches no tensor")
    for o in plan.outputs:
        if isinstance(o.spec, GGUFOutput):
            for p, t in o.spec.tensor_types:
                if not any(re.search(p, n) for n in gguf_names):
                    problems.append(f"outputs[{o.index}].tensor_types {p}={t} matches no tensor")
    for p in problems:
        if plan.recipe.strict:
            raise BadInputError(p, hint="fix the pattern, or drop --strict to only warn")
        plan.warnings.append(p)
    for o in plan.outputs:
        if hasattr(o, "warning"):
            plan.warnings.append(o.warning)


def _check_needs(plan: Plan) -> None:
    r = plan.recipe
    gptq = r.method("gptq")
    uses_gptq = any("gptq" in o.methods.values() for o in plan.outputs)
    if gptq is not None and not uses_gptq:
        plan.warnings.append("the gptq stage matches no tensor it can quantize")
    if uses_gptq and r.calibration is None:
        raise BadInputError(
            "GPTQ needs calibration data",
            hint="pass --dataset (e.g. --dataset wikitext2, or canterbury offline), or add "
            "`calibration:` to the recipe",
        )
    for o in plan.outputs:
        kinds = {g.kind for g in o.grids.values()}
        for stage in r.methods:
            clip = getattr(stage, "clip", "none")
            if clip != "none" and "gguf" in kinds and stage.method in o.methods.values():
                raise BadInputError(
                    f"clip {clip} applies to integer grids; the GGUF blocks of outputs[{o.index}] "
                    "are fitted by llama.cpp's own search",
                    hint="drop --clip, or use an imatrix (--imatrix / imatrix: calibration)",
                )
        if isinstance(gptq, GPTQStage) and gptq.act_order and not gptq.static_groups:
            if "gguf" in kinds and "gptq" in o.methods.values():
                raise BadInputError(
                    "act-order on GGUF blocks needs static groups (a block is a fixed range of "
                    "columns)",
                    hint="add --static-groups, or drop --act-order",
                )
        spec = o.spec
        if isinstance(spec, IntOutput) and spec.activations and not spec.activations.dynamic:
            if not uses_gptq and r.calibration is None:
                raise BadInputError(
                    "static activations need activation statistics",
                    hint="pass --stats FILE from `qtool calibrate`, or --dataset to calibrate now",
                )
        if isinstance(spec, GGUFOutput) and spec.imatrix == "calibration" and r.calibration is None:
            raise BadInputError(
                "imatrix: calibration needs calibration data", hint="add --dataset / calibration:"
            )
    if r.smoothquant is not None and r.calibration is None:
        raise BadInputError(
            "SmoothQuant needs activation statistics",
            hint="pass --stats FILE from `qtool calibrate`, or --dataset to calibrate now",
        )
    if r.smoothquant is not None and plan.source.format == "gguf":
        raise UnsupportedError(
            "SmoothQuant on a GGUF source is not supported", hint="use the HF checkpoint"
        )


# --------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What the run computed before writing: statistics, smoothing, GPTQ results."""

    plan: Plan
    hf: Checkpoint  # the source in HF names and layout (a GGUF source decoded)
    stats: Any = None  # CalibrationStats
    smoothing: Any = None  # methods.smoothquant.Smoothing
    gptq: dict[tuple[str, str], Callable[[], Any]] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    calibration_card: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)  # GPTQ's device, dtype, peak memory
    imatrix: dict[str, Any] | None = None  # GGUF name -> importance, from the calibration
    memory: Any = None  # runner.memory.MemoryPlan of the calibration pass, made once up front


@dataclass
class RunOptions:
    dry_run: bool = False
    resume: Path | None = None
    # continue the run's checkpoints: GPTQ's folder (``resume``, else its default place) and the
    # GGUF outputs' partial files (formats.gguf); ``resume`` given implies it
    resume_all: bool = False
    resume_hint: str | None = None  # how to continue a GGUF output (default --resume OUT.partial)
    device: str = "auto"
    max_memory: int | None = None  # host memory budget in bytes (the memory plan)
    max_gpu_memory: int | None = None
    measure_dataset: str | None = None
    measure_ctx: int = 256
    measure_chunks: int = 8


def run(
    ckpt: Checkpoint,
    recipe: Recipe,
    paths: list[Path | None],
    opts: RunOptions,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Plan, then (unless a dry run) compute and write every output; the result's data."""
    t0 = time.perf_counter()
    recipe = _resolve_compute_dtype(recipe, opts)
    plan = make_plan(ckpt, recipe, paths)
    for w in plan.warnings:
        reporter.warn(w)
    data: dict[str, Any] = {
        "source": ckpt.source,
        "recipe": recipe.to_dict(paths=False),
        "outputs": [o.as_dict() for o in plan.outputs],
    }
    memory = _memory_plan(plan, opts)
    if memory is not None:
        data["memory"] = memory.as_dict()
        for line in memory.lines():
            reporter.info(line)
    if opts.dry_run:
        return {**data, "dry_run": True}
    if any(o.path is None for o in plan.outputs):
        raise BadInputError("no output path", hint="pass -o PATH, or --dry-run")
    from qtool.io import check_writable
    from qtool.runner import dist

    world = dist.world()  # torchrun: every rank runs this; rank 0 alone writes
    world.agree(dist.software() | {"the recipe": data["recipe"]})

    def writable() -> None:
        for o in plan.outputs:
            assert o.path is not None
            check_writable(o.path, folder=o.format != "gguf")
            _refuse_overwriting_source(ckpt, o.path)
        _check_partials(ckpt, recipe, plan, opts)

    world.on_main(writable)
    ctx = Context(plan, hf_view(ckpt, plan.family), memory=memory)
    _statistics(ctx, opts, reporter)
    _transforms(ctx)
    work = _gptq(ctx, opts, reporter)
    if not world.is_main:
        return {**data, "rank": world.rank}
    results = [_write(ctx, o, opts, reporter) for o in plan.outputs]
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    data["outputs"] = results
    data["seconds"] = round(time.perf_counter() - t0, 2)
    if world.active:
        data["processes"] = world.size
    if ctx.compute:
        data["gptq"] = ctx.compute
    if ctx.reports:
        data["layers"] = ctx.reports
        data["gptq_better_than_rtn"] = sum(
            r["gptq_rel_error"] < r["rtn_rel_error"] for r in ctx.reports
        )
    return data


def _check_partials(ckpt: Checkpoint, recipe: Recipe, plan: Plan, opts: RunOptions) -> None:
    """Before any work (rank 0): a GGUF output's checkpoint this run may not continue is
    refused (``recipe``: as the run records it, compute dtype resolved)."""
    from qtool.formats.gguf import check_partial, partial_path, run_identity

    recorded = recipe.to_dict(paths=False)
    for o in plan.outputs:
        if o.format != "gguf" or o.path is None or not partial_path(o.path).is_dir():
            continue
        check_partial(
            o.path,
            run_identity(ckpt, recorded, o.index),
            resume=opts.resume_all,
            hint=opts.resume_hint or f"--resume {partial_path(o.path)}",
        )


def _resolve_compute_dtype(recipe: Recipe, opts: RunOptions) -> Recipe:
    """The recipe with ``compute_dtype: auto`` resolved for this device, as it is recorded (the
    recorded recipe then reproduces the bytes on any machine)."""
    c = recipe.calibration
    if c is None or c.compute_dtype != "auto":
        return recipe
    from qtool.runner.layers import dtype_name, pick_device, resolve_dtype

    name = dtype_name(resolve_dtype("auto", pick_device(opts.device)))
    return recipe.model_copy(update={"calibration": c.model_copy(update={"compute_dtype": name})})


def _memory_plan(plan: Plan, opts: RunOptions) -> Any:
    """What the calibration pass (GPTQ's, or the statistics') will hold, from headers: logged at
    the start, printed by --dry-run, and refused before any work when nothing fits."""
    r = plan.recipe
    gptq = bool(plan.gptq_jobs())
    if r.calibration is None or not (gptq or (plan.needs_stats and not r.calibration.stats)):
        return None  # no calibration pass (statistics from a file feed no forward of ours)
    import torch

    from qtool.runner.layers import DTYPES, pick_device
    from qtool.runner.memory import plan_memory, shape_of

    c = r.calibration
    device = pick_device(opts.device)
    dtype = DTYPES[c.compute_dtype]
    st = r.method("gptq")
    return plan_memory(
        shape_of(plan.source),
        tokens=c.samples * c.seq_len,
        batch_tokens=c.batch_size * c.seq_len,
        seq_len=c.seq_len,
        dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        dtype=c.compute_dtype,
        device=str(device),
        gptq=gptq,
        true_sequential=bool(st is None or st.true_sequential),
        budget_host=opts.max_memory,
        budget_device=opts.max_gpu_memory,
    )


def _refuse_overwriting_source(ckpt: Checkpoint, out: Path) -> None:
    """An output replaced in place must not be (or hold) the source it is made from."""
    out = out.expanduser().resolve()
    for f in [*ckpt.files, ckpt.root]:
        f = Path(f).resolve()
        if f == out or out in f.parents:
            raise BadInputError(
                f"{out}: holds the source {f.name}, which replacing the output would delete",
                hint="choose a new output path",
            )


def hf_view(ckpt: Checkpoint, family: Family) -> Checkpoint:
    """The source with HF tensor names and layout (a GGUF file decoded lazily)."""
    if ckpt.format != "gguf":
        return ckpt
    from qtool.models.gguf_view import GGUFView

    return GGUFView.open(ckpt, family)


def _calibrate_options(recipe: Recipe, opts: RunOptions) -> Any:
    from qtool.calibrate.pipeline import CalibrateOptions

    c = recipe.calibration
    assert c is not None
    return CalibrateOptions(
        dataset=c.dataset,
        samples=c.samples,
        seq_len=c.seq_len,
        seed=c.seed,
        text_field=c.text_field,
        dataset_revision=c.dataset_revision,
        tokenizer=c.tokenizer,
        batch_size=c.batch_size,
        device=opts.device,
        all_experts=c.all_experts,
        dtype=c.compute_dtype,
        max_memory=opts.max_memory,
        max_gpu_memory=opts.max_gpu_memory,
    )


def _statistics(ctx: Context, opts: RunOptions, reporter: Reporter) -> None:
    plan, r = ctx.plan, ctx.plan.recipe
    if not plan.needs_stats:
        return
    from qtool.observers.statsfile import load_stats

    c = r.calibration
    assert c is not None
    if c.stats is not None:
        ctx.stats = load_stats(Path(c.stats), expected_model=ctx.hf)
    else:
        from qtool.calibrate.pipeline import calibrate, prepare

        copts = _calibrate_options(r, opts)
        reporter.info(f"calibrating on {c.dataset} ({c.samples} x {c.seq_len} tokens)")
        ctx.stats = calibrate(prepare(ctx.hf, copts), copts, progress=reporter)
    ds = ctx.stats.meta.get("dataset") or {}
    ctx.calibration_card = {
        "dataset": ds.get("spec"),
        "samples": ds.get("samples"),
        "seq_len": ds.get("seq_len"),
        "tokens_sha256": ds.get("tokens_sha256"),
    }
    if any(
        isinstance(o.spec, GGUFOutput) and o.spec.imatrix == "calibration" for o in plan.outputs
    ):
        from qtool.calibrate.pipeline import imatrix_of

        ctx.imatrix = {
            n: e.importance.reshape(-1) for n, e in imatrix_of(ctx.stats).entries.items()
        }


def _transforms(ctx: Context) -> None:
    sq = ctx.plan.recipe.smoothquant
    if sq is None:
        return
    from qtool.methods.smoothquant import smoothquant
    from qtool.models.smoothed import SmoothedView

    ctx.smoothing = smoothquant(ctx.hf, ctx.stats, sq.alpha)
    ctx.hf = SmoothedView(ctx.hf, ctx.smoothing)  # every later read sees the smoothed model


def _gptq(ctx: Context, opts: RunOptions, reporter: Reporter) -> Path | None:
    jobs = ctx.plan.gptq_jobs()
    if not jobs:
        return None
    from qtool.calibrate.pipeline import prepare
    from qtool.methods.gptq import GPTQConfig
    from qtool.runner.sequential import SequentialOptions, WorkDir, gptq_model, run_identity

    r = ctx.plan.recipe
    st = r.method("gptq")
    assert isinstance(st, GPTQStage) and r.calibration is not None
    copts = _calibrate_options(r, opts)
    prep = prepare(ctx.hf, copts)
    ids = prep.samples.ids
    static_outputs = [
        o
        for o in ctx.plan.outputs
        if isinstance(o.spec, IntOutput) and o.spec.activations and not o.spec.activations.dynamic
    ]
    seq = SequentialOptions(
        gptq=GPTQConfig(
            damp=st.damp,
            block_size=st.block_size,
            act_order=st.act_order,
            static_groups=st.static_groups,
        ),
        true_sequential=st.true_sequential,
        batch_size=copts.batch_size,
        device=opts.device,
        compute_dtype=copts.dtype,
        input_absmax=bool(static_outputs),
        all_experts=copts.all_experts,
        place=ctx.memory.placement,
    )
    identity = run_identity(ctx.hf, ids, seq, jobs)
    first = ctx.plan.outputs[0].path
    assert first is not None
    work_path = opts.resume or first.with_name(first.name + GPTQ_WORK_SUFFIX)
    from qtool.runner import dist

    world = dist.world()
    work = WorkDir.open(
        work_path, identity, resume=opts.resume is not None or opts.resume_all, world=world
    )
    if opts.resume is None:
        reporter.info(
            f"checkpoints in {work_path}; if interrupted, rerun with --resume {work_path}"
        )
    dist.note_resume(work_path)
    fresh = work.layers_done == 0
    try:
        res = gptq_model(ctx.hf, ids, jobs, seq, work, reporter=reporter)
    except PeerError as e:
        raise PeerError(e.message, hint=f"rerun with --resume {work_path}") from e
    except BadInputError:
        if fresh and world.is_main:  # bad input will fail the same way again: nothing to resume
            shutil.rmtree(work_path, ignore_errors=True)
        raise
    ctx.gptq = res.weights
    ctx.reports = res.reports
    ctx.compute = {
        "device": res.device,
        "dtype": res.compute_dtype,
        "seconds": round(res.seconds, 2),
        "peak_host_bytes": res.peak_host_bytes,
        "peak_device_bytes": res.peak_device_bytes,
        "resumed_from_layer": res.resumed_from,
    }
    d = prep.dataset
    ctx.calibration_card = {
        "dataset": d["spec"],
        "samples": d["samples"],
        "seq_len": d["seq_len"],
        "tokens_sha256": d["tokens_sha256"],
    }
    return work_path


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _weight(ctx: Context, module: str) -> Any:
    """A decoder linear's float32 weight as the methods see it (SmoothQuant applied by the
    view); one expert of a fused MoE tensor through the family's reader (gpt-oss)."""
    import torch

    name = module + ".weight"
    if name not in ctx.hf.tensors:
        h = ctx.hf
        rows = h.read_rows if h.format == "safetensors" else None
        read = ctx.plan.family.virtual_reader(name, h.tensors, h.read, rows)
        if read is not None:
            return torch.as_tensor(read()).to(torch.float32)
    return ctx.hf.read(name).to(torch.float32)


def _importance(ctx: Context, module: str, grid: Any) -> Any:
    """RTN's per-column weights: the calibration statistics' mean x^2 (SmoothQuant applied)."""
    if ctx.stats is None:
        return None
    import numpy as np
    import torch

    from qtool.methods.smoothquant import stats_name

    imp = torch.from_numpy(
        np.asarray(ctx.stats[stats_name(ctx.stats, module)].importance, np.float32)
    )
    if ctx.smoothing is not None and module in ctx.smoothing.factors:
        imp = imp / ctx.smoothing.factors[module].square()  # the input is x / s
    return imp


def _quantizer(ctx: Context, o: OutputPlan, module: str) -> Callable[[], Any]:
    grid, method = o.grids[module], o.methods[module]

    def quantize() -> Any:
        if method == "gptq":
            return ctx.gptq[(module, grid.key)]()
        w = _weight(ctx, module)
        if method == "bitnet":
            from qtool.methods.bitnet import bitnet_quantize

            return bitnet_quantize(module, w, grid)
        imp = None
        if grid.kind == "int" and grid.clip.method == "mse":
            imp = _importance(ctx, module, grid)
        return grid.rtn(module, w, imp)

    return quantize


def _alpha(ctx: Context) -> float | None:
    sq = ctx.plan.recipe.smoothquant
    return sq.alpha if sq is not None and ctx.smoothing is not None else None


def _write(ctx: Context, o: OutputPlan, opts: RunOptions, reporter: Reporter) -> dict[str, Any]:
    assert o.path is not None
    recipe = _recorded(ctx.plan.recipe, o)
    if isinstance(o.spec, GGUFOutput):
        return _write_gguf(ctx, o, recipe, opts, reporter)
    if isinstance(o.spec, IntOutput):
        return _write_int(ctx, o, recipe, opts, reporter)
    if isinstance(o.spec, BitNetOutput):
        return _write_bitnet(ctx, o, recipe, reporter)
    if isinstance(o.spec, MXFP4Output):
        return _write_mxfp4(ctx, o, recipe, opts, reporter)
    return _write_dense(ctx, o, recipe, reporter)


def _recorded(recipe: Recipe, o: OutputPlan) -> dict[str, Any]:
    """The resolved recipe as recorded in an output: no paths (the same recipe reproduces it
    wherever written) and this output's index."""
    d = recipe.to_dict(paths=False)
    d["recorded_output"] = o.index
    return d


def _write_gguf(
    ctx: Context, o: OutputPlan, recipe: dict[str, Any], opts: RunOptions, reporter: Reporter
) -> dict[str, Any]:
    import json

    import numpy as np

    from qtool.calibrate.imatrix import check_imatrix, read_imatrix
    from qtool.formats.gguf import partial_path, run_identity, write_gguf

    spec: GGUFOutput = o.spec
    src = ctx.plan.source
    imat = None
    if spec.imatrix == "calibration":
        imat = ctx.imatrix
    elif spec.imatrix is not None:
        imat = read_imatrix(spec.imatrix)
        check_imatrix(imat, {e.name: e.shape[-1] for e in o.gguf.entries}, spec.imatrix)
    requant = sorted(
        {e.source_type for e in o.gguf.entries if e.source_type not in ("F32", "F16", "BF16", "")}
    )
    if src.format == "gguf" and requant:
        reporter.warn(
            f"{src.source} is already quantized ({', '.join(requant)}): requantizing loses "
            "quality (llama-quantize asks for --allow-requantize); quantize the F16/F32 file"
        )
    hf_of = {e.name: e.hf_name for e in o.entries}

    def payloads(e: Any) -> Any:
        hf = hf_of.get(e.name)
        srcs = [s.removesuffix(".weight") for s in e.tensor.experts or e.tensor.sources]
        if hf is None and len(srcs) > 1 and all(s in o.grids for s in srcs):
            # MoE experts, in expert order, into one array (never all of them twice)
            first = _quantizer(ctx, o, srcs[0])()
            d0 = np.asarray(first.data)
            n = d0.shape[0]
            data = np.empty((n * len(srcs), *d0.shape[1:]), d0.dtype)
            data[:n] = d0
            for k, s in enumerate(srcs[1:], 1):
                data[k * n : (k + 1) * n] = np.asarray(_quantizer(ctx, o, s)().data)
            return dataclasses.replace(first, data=data)
        if hf is None:
            return None
        module = hf.removesuffix(".weight")
        if module not in o.grids:
            return None
        if src.format == "gguf" and o.methods[module] == "rtn":
            return None  # requantize from the file's own rows, as llama-quantize does
        got = _quantizer(ctx, o, module)()
        if src.format == "gguf":  # back to the file's row order
            got = dataclasses.replace(got, data=ctx.plan.family.rows_to_gguf(hf, got.data))
        return got

    assert o.path is not None
    out_path = o.path
    tokens: dict[str, Any] = {}

    def verify(written: Path) -> None:  # the complete file, before it replaces the output
        tokens.update(_check_tokenizer(ctx, written, out_path, reporter) or {})

    size = write_gguf(
        o.path,
        o.gguf,
        ctx.hf if src.format != "gguf" else src,
        ctx.plan.family,
        payloads=payloads,
        imatrix=imat,
        tokenizer_pre=spec.tokenizer_pre,
        extra_kv={"qtool.recipe": json.dumps(recipe, sort_keys=True)},
        reporter=reporter,
        resume=opts.resume is not None or opts.resume_all,
        identity=run_identity(src, ctx.plan.recipe.to_dict(paths=False), o.index),
        resume_hint=opts.resume_hint or f"--resume {partial_path(o.path)}",
        verify=verify,
    )
    params = sum(int(np.prod(e.shape)) for e in o.gguf.entries if not e.name.startswith("rope_"))
    from qtool.formats.folder import _footprint

    return {
        "footprint": _footprint(src),
        "format": "gguf",
        "path": str(o.path),
        "preset": spec.type,
        "arch": o.gguf.arch,
        "bytes": size,
        "tensor_bytes": o.gguf.tensor_bytes,
        "bits_per_weight": 8 * size / params if params else 0.0,
        "types": o.gguf.type_counts(),
        "methods": _method_counts(o),
        "vocab": o.gguf.vocab,
        "tokenizer_check": tokens or None,
        "tensors": [e.as_dict() for e in o.entries],
    }


def _check_tokenizer(
    ctx: Context, written: Path, path: Path, reporter: Reporter
) -> dict[str, Any] | None:
    """Tokenizer fidelity (:mod:`qtool.formats.tokcheck`) of the complete file ``written``,
    before it becomes the output ``path``: a difference is a warning, an error with ``strict``
    (then nothing is published). A GGUF source's vocabulary is copied as is: nothing to check."""
    from qtool.formats.tokcheck import check_tokenizer

    src = ctx.plan.source
    if src.format == "gguf":
        return None
    strict = ctx.plan.recipe.strict
    res = check_tokenizer(written, src.root)
    if not res.ran:
        msg = f"tokenizer check not run: {res.reason}"
        if strict:
            raise BadInputError(f"--strict: {msg}", hint="pip install llama-cpp-python")
        reporter.info(msg)
        return res.as_dict()
    if res.differ:
        ex = res.differ[0]
        msg = (
            f"{path}: llama.cpp tokenizes {len(res.differ)} of {res.strings} test strings "
            f"differently from the source's tokenizer (e.g. {ex['text'][:40]!r} at token "
            f"{ex['first_difference']}: {ex['llama.cpp']} vs {ex['transformers']})"
        )
        hint = "check --tokenizer-pre (llama.cpp's pre-tokenizer name) and the tokenizer files"
        if strict:
            raise BadInputError(msg + "; nothing written", hint=hint)
        reporter.warn(f"{msg}; {hint}")
    else:
        reporter.info(f"tokenizer check: llama.cpp and transformers agree on {res.strings} strings")
    return res.as_dict()


def _method_counts(o: OutputPlan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in o.entries:
        if e.method:
            counts[e.method] = counts.get(e.method, 0) + 1
    return counts


def _write_int(
    ctx: Context, o: OutputPlan, recipe: dict[str, Any], opts: RunOptions, reporter: Reporter
) -> dict[str, Any]:
    from qtool.formats.folder import ActivationQuant, WriteRequest, write_checkpoint

    spec: IntOutput = o.spec
    schemes = {g.key: g for g in o.grids.values()}
    if len(schemes) > 1:
        raise UnsupportedError(
            f"outputs[{o.index}]: the tensors would use {len(schemes)} schemes "
            f"({', '.join(schemes)}); a {spec.format} folder holds one",
            hint="give the methods the same clipping",
        )
    scheme = next(iter(schemes.values()))
    activations = None
    if spec.activations is not None:
        scales = None
        if not spec.activations.dynamic:
            if "gptq" in o.methods.values():
                absmax = {r["name"]: float(r["input_absmax"]) for r in ctx.reports}
                scales = {n: max(absmax[n], 1e-8) / 127.0 for n in o.grids}
            else:
                from qtool.methods.smoothquant import static_input_scales

                scales = static_input_scales(ctx.stats, list(o.grids), ctx.smoothing)
        activations = ActivationQuant(bits=8, dynamic=spec.activations.dynamic, input_scales=scales)
    card: dict[str, Any] = {"source": ctx.plan.source.source, **ctx.calibration_card}
    notes = []
    if ctx.smoothing is not None:
        notes.append(f"SmoothQuant migration strength alpha = {_alpha(ctx)}.")
    if ctx.stats is not None and any(
        m == "rtn" and o.grids[n].clip.method == "mse" for n, m in o.methods.items()
    ):
        notes.append(
            "MSE clipping weighted by each input channel's mean x^2 from the calibration "
            "statistics."
        )
    if notes:
        card["notes"] = " ".join(notes)
    methods = set(o.methods.values())
    gptq = ctx.plan.recipe.method("gptq")
    assert o.path is not None
    req = WriteRequest(
        source=ctx.hf,
        out_dir=o.path,
        format=spec.format,
        scheme=scheme,
        weights={m: _quantizer(ctx, o, m) for m in o.grids},
        method="gptq" if "gptq" in methods else "rtn",
        activations=activations,
        gptq={**gptq.model_dump(exclude={"method", "include", "exclude", "clip"})}
        if gptq is not None and "gptq" in methods
        else {},
        card=card,
        measure=_measurer(ctx, opts, [r for r in ctx.reports if r["name"] in o.grids])
        if (opts.measure_dataset or ctx.reports)
        else None,
        recipe=recipe,
        reporter=reporter,
    )
    if req.gptq:
        req.gptq = {
            "damp_percent": gptq.damp,
            "block_size": gptq.block_size,
            "desc_act": gptq.act_order,
            "static_groups": gptq.static_groups,
            "true_sequential": gptq.true_sequential,
        }
    result = write_checkpoint(req)
    d = {"format": spec.format, "path": str(o.path), "scheme": scheme.to_json()}
    for k in ("files", "bytes", "tensor_bytes", "bits_per_weight", "quality", "footprint"):
        v = getattr(result, k, None)
        if v is not None:
            d[k] = v
    d["methods"] = _method_counts(o)
    if activations is not None:
        d["activations"] = {
            "bits": 8,
            "dynamic": activations.dynamic,
            "smoothquant": _alpha(ctx),
        }
    return d


def _write_bitnet(
    ctx: Context, o: OutputPlan, recipe: dict[str, Any], reporter: Reporter
) -> dict[str, Any]:
    from qtool.formats.bitnet import write_bitnet_checkpoint
    from qtool.formats.folder import folder_files
    from qtool.io import atomic_dir

    spec: BitNetOutput = o.spec
    assert o.path is not None
    with atomic_dir(o.path) as tmp:
        write_bitnet_checkpoint(
            ctx.hf,
            tmp,
            {m: _quantizer(ctx, o, m) for m in o.grids},
            spec.variant,
            recipe=recipe,
            reporter=reporter,
            label=o.path.name,
        )
        files, nbytes = folder_files(tmp)
    return {
        "format": "bitnet",
        "path": str(o.path),
        "variant": spec.variant,
        "bytes": nbytes,
        "files": files,
        "methods": _method_counts(o),
    }


def _write_mxfp4(
    ctx: Context, o: OutputPlan, recipe: dict[str, Any], opts: RunOptions, reporter: Reporter
) -> dict[str, Any]:
    from qtool.formats.mxfp4 import write_mxfp4

    assert o.path is not None
    fused = ctx.plan.family.fused_experts(ctx.hf.tensors)  # type: ignore[attr-defined]
    methods = _module_counts(o)
    res = write_mxfp4(
        ctx.hf,
        o.path,
        fused,
        {m: _quantizer(ctx, o, m) for m in o.grids},
        card={"source": ctx.plan.source.source, "methods": methods,
              **ctx.calibration_card},
        measure=_measurer(ctx, opts, [r for r in ctx.reports if r["name"] in o.grids])
        if (opts.measure_dataset or ctx.reports)
        else None,
        recipe=recipe,
        reporter=reporter,
    )  # fmt: skip
    return {**res, "methods": methods}


def _module_counts(o: OutputPlan) -> dict[str, int]:
    """Quantized linears per method (one MoE expert's projection counts once)."""
    counts: dict[str, int] = {}
    for m in o.methods.values():
        counts[m] = counts.get(m, 0) + 1
    return counts


def _write_dense(
    ctx: Context, o: OutputPlan, recipe: dict[str, Any], reporter: Reporter
) -> dict[str, Any]:
    from qtool.formats.dense import write_dense

    assert o.path is not None
    return write_dense(
        ctx.hf, o.path, o.spec.dtype, recipe=recipe, reporter=reporter, family=ctx.plan.family
    )


def _measurer(
    ctx: Context, opts: RunOptions, reports: list[dict[str, Any]]
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
            q["RTN output error, same grid"] = round(
                sum(r["rtn_rel_error"] for r in reports) / n, 5
            )
            q["linears where GPTQ beats RTN"] = (
                f"{sum(r['gptq_rel_error'] < r['rtn_rel_error'] for r in reports)}/{n}"
            )
        if not opts.measure_dataset:
            return q
        from qtool.evaluate.runner import EvalSettings, run_eval

        r = run_eval(
            EvalSettings(
                artifacts=[str(path)],
                base=ctx.plan.source.source,
                dataset=str(opts.measure_dataset),
                ctx=opts.measure_ctx,
                chunks=opts.measure_chunks,
            )
        )
        a = r["artifacts"][0]
        q.update(
            {
                "eval text": f"{r['settings']['dataset']} ({r['settings']['chunks']} x "
                f"{opts.measure_ctx} tokens, {r['tokens']['scored']} scored)",
                "base PPL": round(float(a["base_ppl"] if "base_ppl" in a else r["base"]["ppl"]), 4),
                "PPL": round(float(a["ppl"]), 4),
                "delta PPL": round(float(a["delta_ppl"]), 4),
                "KLD mean": round(float(a["kld"]["mean"]), 6),
                "KLD p99": round(float(a["kld"]["p99"]), 6),
                "top-1 agreement": round(float(a["top1"]), 4),
            }
        )
        return q

    return measure


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_json(paths=False).encode()).hexdigest()[:16]
