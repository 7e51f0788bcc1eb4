"""Recipes: what ``qtool quantize`` does, as one validated object with a YAML/JSON form.

A recipe lists **stages** (transforms such as SmoothQuant, then methods, each with the tensors
it applies to), the **calibration** data the stages need, and one or more **outputs** (a format
and the grid it stores: a GGUF type or preset, an integer scheme, ternary). Every CLI flag of
``qtool quantize`` maps onto a field here; the CLI builds a recipe, the API runs it, and every
output records the resolved recipe (all defaults filled in, no output paths), so feeding it back
gives the same bytes::

    qtool_recipe: 1
    calibration: {dataset: canterbury, samples: 128, seq_len: 512}
    stages:
      - transform: smoothquant
        alpha: 0.5
      - method: gptq
        act_order: true
        static_groups: true
    outputs:
      - format: gguf
        type: Q4_K_M
        path: model-q4km.gguf
      - format: gptq
        bits: 4
        group_size: 128
        path: model-gptq

Tensor patterns (``include``/``exclude`` of a method stage, llama-quantize's ``tensor_types``):
a glob (``*mlp.down_proj``) or, with a ``re:`` prefix, a regular expression searched in the name
(``re:layers\\.[0-3]\\.``), as compressed-tensors' ``targets``/``ignore`` write them. A method
pattern is matched against both the Hugging Face module name (``model.layers.0.mlp.down_proj``)
and llama.cpp's tensor name (``blk.0.ffn_down.weight``).

Validation uses pydantic (unknown keys are errors; the first problem becomes one line naming
the field); everything that needs the model (patterns matching nothing, a grid a format cannot
hold) is checked by the pipeline before any work.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from qtool.errors import BadInputError

RECIPE_VERSION = 1
METHODS = ("rtn", "gptq", "bitnet")
TRANSFORMS = ("smoothquant",)
FORMATS = ("gguf", "gptq", "compressed-tensors", "bitnet", "mxfp4", "safetensors")


class RecipeError(BadInputError):
    """A recipe that does not parse or validate (exit code 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


class Calibration(_Strict):
    """The calibration samples every stage that needs data shares (one pass feeds them all)."""

    dataset: str = "wikitext2"
    samples: Annotated[int, Field(ge=1)] = 128
    seq_len: Annotated[int, Field(ge=2)] = 512
    seed: int = 0
    text_field: str | None = None
    dataset_revision: str | None = None
    tokenizer: str | None = None
    batch_size: Annotated[int, Field(ge=1)] = 1
    # MoE: every token through every expert for statistics and Hessians (output unchanged)
    all_experts: bool = False
    # the forward passes' dtype; statistics and Hessians accumulate in float32 or wider.
    # "auto": bfloat16 where the device multiplies it fast, else float32 (recorded resolved)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # statistics from `qtool calibrate` instead of a calibration pass (SmoothQuant, static
    # activation scales, importance-weighted RTN)
    stats: str | None = None


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------


class _Targets(_Strict):
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            compile_pattern(p)
        return v


class SmoothQuantStage(_Strict):
    """SmoothQuant (Xiao et al. 2023): activation outliers moved into the weights, folded
    into the preceding norms. Needs activation statistics."""

    transform: Literal["smoothquant"]
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


class RTNStage(_Targets):
    """Round-to-nearest on each tensor's grid, with range clipping on integer grids
    (``none``, ``percentile:P``, ``mse``, ``kl``; ``mse`` is weighted by the calibration
    statistics when the recipe has them)."""

    method: Literal["rtn"]
    clip: str = "none"

    @field_validator("clip")
    @classmethod
    def _clip(cls, v: str) -> str:
        from qtool.grids.affine import Clip

        return str(Clip.parse(v))


class GPTQStage(_Targets):
    """GPTQ (Frantar et al. 2022) on each decoder linear's grid, layer by layer."""

    method: Literal["gptq"]
    damp: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01
    block_size: Annotated[int, Field(ge=1)] = 128
    # act-order with static groups by default: the best of the measured settings (README,
    # "GPTQ defaults"); static groups follow act-order unless set
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    clip: str = "none"

    @model_validator(mode="before")
    @classmethod
    def _resolve_static_groups(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("static_groups") is None:
            return {**data, "static_groups": data.get("act_order", True)}
        return data

    @field_validator("clip")
    @classmethod
    def _clip(cls, v: str) -> str:
        from qtool.grids.affine import Clip

        return str(Clip.parse(v))


class BitNetStage(_Targets):
    """BitNet absmean (b1.58 ternary) or sign (1-bit) weights for the decoder linears."""

    method: Literal["bitnet"]


def _stage_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("method") or v.get("transform")
    return getattr(v, "method", None) or getattr(v, "transform", None)


Stage = Annotated[
    Annotated[SmoothQuantStage, Tag("smoothquant")]
    | Annotated[RTNStage, Tag("rtn")]
    | Annotated[GPTQStage, Tag("gptq")]
    | Annotated[BitNetStage, Tag("bitnet")],
    Discriminator(_stage_tag),
]


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


class Activations(_Strict):
    bits: Literal[8] = 8
    dynamic: bool = True  # per-token dynamic; False: static per-tensor input scales


class GGUFOutput(_Strict):
    """A GGUF file: a type or llama-quantize preset, with llama-quantize's per-tensor rules."""

    format: Literal["gguf"]
    type: str = "F16"
    tensor_types: list[tuple[str, str]] = Field(default_factory=list)
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    # an imatrix file, or "calibration": computed from the recipe's calibration samples
    imatrix: str | None = None
    tokenizer_pre: str | None = None
    path: str | None = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        from qtool.policy import resolve_preset

        try:
            return resolve_preset(v)
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("tensor_types", mode="before")
    @classmethod
    def _tensor_types(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return list(v.items())
        out = []
        for item in v or []:
            if isinstance(item, str):
                if "=" not in item:
                    raise ValueError(f"{item!r}: expected PATTERN=TYPE, e.g. attn_v=Q6_K")
                item = tuple(item.rsplit("=", 1))
            out.append(item)
        return out

    @field_validator("tensor_types")
    @classmethod
    def _tensor_types_known(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for pattern, t in v:
            _known_type(t)
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return [(p, _known_type(t)) for p, t in v]

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _single_type(cls, v: str | None) -> str | None:
        return None if v is None else _known_type(v)


class IntOutput(_Strict):
    """A safetensors folder of integer weights: the GPTQ v1 layout (AutoGPTQ / GPTQModel) or
    compressed-tensors (``pack-quantized``; ``int-quantized`` with 8-bit activations)."""

    format: Literal["gptq", "compressed-tensors"]
    bits: Annotated[int, Field(ge=2, le=8)] = 4
    group_size: int = 128  # -1: one scale per output channel
    granularity: Literal["tensor", "channel", "group"] | None = None  # default: from group_size
    sym: bool = True
    restricted: bool = False
    activations: Activations | None = None
    path: str | None = None

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be positive, or -1 for one scale per output channel")
        return v

    @property
    def resolved_granularity(self) -> str:
        return self.granularity or ("channel" if self.group_size == -1 else "group")


class BitNetOutput(_Strict):
    """transformers' BitNet safetensors layout (ternary), or dense 1-bit weights (binary)."""

    format: Literal["bitnet"]
    variant: Literal["ternary", "binary"] = "ternary"
    path: str | None = None


class MXFP4Output(_Strict):
    """transformers' MXFP4 layout (``quant_method: mxfp4``, gpt-oss): the MoE experts as E2M1
    codes with an E8M0 exponent per 32 weights, every other tensor as the source stores it."""

    format: Literal["mxfp4"]
    path: str | None = None


class DenseOutput(_Strict):
    """An HF safetensors checkpoint of float weights (e.g. a GGUF file converted back)."""

    format: Literal["safetensors"]
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    path: str | None = None


Output = Annotated[
    GGUFOutput | IntOutput | BitNetOutput | MXFP4Output | DenseOutput,
    Field(discriminator="format"),
]


# --------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------


class Recipe(_Strict):
    """Stages, calibration data, outputs. ``strict``: a pattern matching no tensor is an
    error rather than a warning."""

    qtool_recipe: Literal[1] = 1  # RECIPE_VERSION
    calibration: Calibration | None = None
    stages: list[Stage] = Field(default_factory=list)
    outputs: list[Output] = Field(min_length=1)
    strict: bool = False

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_kind(cls, v: Any) -> Any:
        for i, st in enumerate(v or []):
            if not isinstance(st, dict):
                raise ValueError(f"stages[{i}]: expected a mapping with `method:` or `transform:`")
            if "method" in st and st["method"] not in METHODS:
                raise ValueError(
                    f"stages[{i}]: unknown method {st['method']!r}; choose one of "
                    f"{', '.join(METHODS)}"
                )
            if "transform" in st and st["transform"] not in TRANSFORMS:
                raise ValueError(
                    f"stages[{i}]: unknown transform {st['transform']!r}; choose one of "
                    f"{', '.join(TRANSFORMS)}"
                )
            if "method" not in st and "transform" not in st:
                raise ValueError(f"stages[{i}]: needs `method:` or `transform:`")
        return v

    @field_validator("outputs", mode="before")
    @classmethod
    def _output_kind(cls, v: Any) -> Any:
        for i, o in enumerate(v or []):
            if not isinstance(o, dict) or "format" not in o:
                raise ValueError(f"outputs[{i}]: needs `format:` ({', '.join(FORMATS)})")
            if o["format"] not in FORMATS:
                raise ValueError(
                    f"outputs[{i}]: unknown format {o['format']!r}; choose one of "
                    f"{', '.join(FORMATS)}"
                )
        return v

    # -- views -----------------------------------------------------------------------------------

    @property
    def methods(self) -> list[RTNStage | GPTQStage | BitNetStage]:
        return [s for s in self.stages if not isinstance(s, SmoothQuantStage)]

    @property
    def smoothquant(self) -> SmoothQuantStage | None:
        return next((s for s in self.stages if isinstance(s, SmoothQuantStage)), None)

    def method(self, name: str) -> Any:
        return next((s for s in self.methods if s.method == name), None)

    # -- forms -----------------------------------------------------------------------------------

    def to_dict(self, *, paths: bool = True) -> dict[str, Any]:
        """Every field, defaults included (``paths=False``: outputs without their paths, the
        form recorded in outputs, so the same recipe reproduces them wherever written)."""
        d = self.model_dump(mode="json")
        if not paths:
            for o in d["outputs"]:
                o.pop("path", None)
        return d

    def to_yaml(self, *, paths: bool = True) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(paths=paths), sort_keys=False)

    def to_json(self, *, paths: bool = True) -> str:
        return json.dumps(self.to_dict(paths=paths), sort_keys=True, separators=(",", ":"))


def _known_type(t: str) -> str:
    from qtool.kernels.types import get_type

    try:
        return get_type(t).name
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None


def parse(data: Any, *, where: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping; the first problem becomes one line."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{where}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{where}: {_first_error(e)}") from None


_TAGS = {*METHODS, *TRANSFORMS, *FORMATS}


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ""
    prev: object = None
    for part in err["loc"]:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif isinstance(prev, int) and part in _TAGS:
            pass  # the discriminator's tag pydantic puts after a list index
        elif isinstance(part, str) and (part.endswith(("Output", "Stage")) or "-" in part):
            pass  # pydantic's union-member labels
        else:
            loc += f".{part}" if loc else str(part)
        prev = part
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "literal_error" and loc.endswith(("method", "transform", "format")):
        msg = f"{err.get('input')!r} is not valid here"
    return f"{loc}: {msg}" if loc else msg


def load(path: str | Path) -> Recipe:
    """Read a recipe file (YAML or JSON: JSON is YAML)."""
    import yaml

    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise RecipeError(f"{p}: not valid YAML{at} ({problem})") from None
    except RecursionError:
        raise RecipeError(f"{p}: not valid YAML (nested too deeply)") from None
    return parse(data, where=str(p))


# --------------------------------------------------------------------------------------------
# tensor patterns
# --------------------------------------------------------------------------------------------


def compile_pattern(p: str) -> re.Pattern[str]:
    """A glob, or a regular expression after ``re:``; both become one compiled regex."""
    if not isinstance(p, str) or not p:
        raise ValueError(f"{p!r}: a pattern must be a non-empty string")
    if p.startswith("re:"):
        try:
            return re.compile(p[3:])
        except re.error as e:
            raise ValueError(f"{p!r} is not a regular expression ({e})") from None
    return re.compile(fnmatch.translate(p))


def matches(pattern: str, *names: str) -> bool:
    """Whether ``pattern`` matches any of ``names`` (a glob matches whole names, a ``re:``
    pattern is searched)."""
    rx = compile_pattern(pattern)
    if pattern.startswith("re:"):
        return any(rx.search(n) for n in names)
    return any(rx.match(n) for n in names)


# --------------------------------------------------------------------------------------------
# flags -> recipe
# --------------------------------------------------------------------------------------------

# Every option of `qtool quantize` that sets a recipe field: name -> the flag users type.
FLAGS = {
    "method": "--method",
    "type": "--type",
    "bits": "--bits",
    "group_size": "--group-size",
    "granularity": "--granularity",
    "asym": "--asym/--sym",
    "restricted": "--restricted",
    "clip": "--clip",
    "format": "--format",
    "act_bits": "--act-bits",
    "act_static": "--act-static",
    "smoothquant": "--smoothquant",
    "stats": "--stats",
    "dataset": "--dataset",
    "samples": "--samples",
    "seq_len": "--seq-len",
    "seed": "--seed",
    "text_field": "--text-field",
    "tokenizer": "--tokenizer",
    "batch_size": "--batch-size",
    "all_experts": "--all-experts",
    "compute_dtype": "--compute-dtype",
    "damp": "--damp",
    "block_size": "--block-size",
    "act_order": "--act-order/--no-act-order",
    "static_groups": "--static-groups/--no-static-groups",
    "true_sequential": "--true-sequential/--no-true-sequential",
    "imatrix": "--imatrix",
    "tensor_type": "--tensor-type",
    "output_tensor_type": "--output-tensor-type",
    "token_embedding_type": "--token-embedding-type",
    "pure": "--pure",
    "tokenizer_pre": "--tokenizer-pre",
    "strict": "--strict",
}
GGUF_ONLY = ("imatrix", "tensor_type", "output_tensor_type", "token_embedding_type", "pure")
INT_ONLY = ("bits", "group_size", "granularity", "asym", "restricted", "act_bits", "act_static")
GPTQ_ONLY = ("damp", "block_size", "act_order", "static_groups", "true_sequential")
CALIBRATION = (
    "dataset",
    "samples",
    "seq_len",
    "seed",
    "text_field",
    "tokenizer",
    "batch_size",
    "all_experts",
    "compute_dtype",
)
METHOD_ALIASES = {"kquant": "rtn"}


# recipe field -> the flag that sets it, to name flags in validation errors
_FIELD_FLAGS = {
    "bits": "bits",
    "group_size": "group_size",
    "granularity": "granularity",
    "damp": "damp",
    "block_size": "block_size",
    "alpha": "smoothquant",
    "samples": "samples",
    "seq_len": "seq_len",
    "batch_size": "batch_size",
    "type": "type",
    "tensor_types": "tensor_type",
    "output_tensor_type": "output_tensor_type",
    "token_embedding_type": "token_embedding_type",
    "clip": "clip",
}


def _parse_options(recipe: dict[str, Any], given: dict[str, Any]) -> Recipe:
    """:func:`parse` for a recipe built from options: an error names the option."""
    try:
        return parse(recipe, where="options")
    except RecipeError as e:
        m = re.match(r"options: (?:[\w-]+(?:\[\d+\])*\.)*(\w+)(?:\[\d+\])*: (.*)", e.message)
        if m and m.group(1) in _FIELD_FLAGS:
            key = _FIELD_FLAGS[m.group(1)]
            value = given.get(key)
            shown = f" {value}" if value is not None and not isinstance(value, list) else ""
            raise RecipeError(f"{FLAGS[key]}{shown}: {m.group(2)}") from None
        raise


def _refuse(name: str, why: str, hint: str | None = None) -> RecipeError:
    return RecipeError(f"{FLAGS.get(name, name)} {why}", hint=hint)


def from_options(output_path: str | None = None, **given: Any) -> Recipe:
    """The recipe a set of ``qtool quantize`` options describes. ``given`` holds only the
    options the user set (``None`` values are ignored); an option that does not apply to what
    the others ask for is an error naming it, never silently dropped."""
    o = {k: v for k, v in given.items() if v is not None and v != []}
    unknown = sorted(set(o) - set(FLAGS))
    if unknown:
        raise RecipeError(f"unknown option {unknown[0]!r}")
    method = METHOD_ALIASES.get(str(o.get("method", "rtn")), str(o.get("method", "rtn")))
    if method not in METHODS:
        raise RecipeError(
            f"--method {o['method']!r} is unknown; choose one of kquant, {', '.join(METHODS)}"
        )
    fmt = o.get("format")
    if fmt is not None and fmt not in (*FORMATS, "safetensors"):
        raise _refuse("format", f"{fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if o.get("method") == "kquant" and fmt not in (None, "gguf"):
        raise _refuse("format", f"{fmt}: --method kquant writes GGUF")

    # -- which output ------------------------------------------------------------------------
    if method == "bitnet":
        bits = o.get("bits", 2)
        if bits not in (1, 2):
            raise _refuse(
                "bits",
                f"{bits}: --method bitnet takes --bits 2 (ternary b1.58, the default) or "
                "--bits 1 (sign/beta)",
            )
        if fmt is None:
            fmt = "bitnet" if bits == 1 else "gguf"
        if fmt == "safetensors":
            fmt = "bitnet"
        if fmt not in ("gguf", "bitnet"):
            raise _refuse("format", f"{fmt}: BitNet writes gguf or safetensors")
        if bits == 1 and fmt == "gguf":
            raise RecipeError(
                "GGUF has no 1-bit type", hint="use --format safetensors, or ternary (--bits 2)"
            )
        for k in INT_ONLY[1:] + GPTQ_ONLY + ("clip", "smoothquant", "stats") + CALIBRATION:
            if k in o:
                raise _refuse(k, "does not apply to --method bitnet")
        if fmt == "bitnet":
            if "type" in o:
                raise _refuse("type", "applies to BitNet GGUF output (TQ1_0 or TQ2_0)")
            for k in GGUF_ONLY + ("tokenizer_pre",):
                if k in o:
                    raise _refuse(k, "applies to GGUF output")
            out: dict[str, Any] = {
                "format": "bitnet",
                "variant": "binary" if bits == 1 else "ternary",
            }
        else:
            qtype = str(o.get("type", "TQ2_0")).upper()
            if qtype not in ("TQ1_0", "TQ2_0"):
                raise _refuse("type", f"{qtype}: BitNet GGUF uses TQ1_0 or TQ2_0")
            out = _gguf_output(o, qtype)
        return _parse_options(
            {
                "stages": [{"method": "bitnet"}],
                "outputs": [_with_path(out, output_path)],
                "strict": bool(o.get("strict")),
            },
            o,
        )

    if fmt is None:
        if "type" in o or (output_path or "").endswith(".gguf"):
            fmt = "gguf"
        elif "bits" in o:
            gptq_fmt = method == "gptq" and o["bits"] in (2, 3, 4, 8) and "act_bits" not in o
            fmt = "gptq" if gptq_fmt else "compressed-tensors"
        elif "method" in o:
            raise RecipeError(
                f"--method {o['method']} needs --bits (an integer output) or --type (GGUF)",
                hint="e.g. --bits 4, or --type Q4_K_M",
            )
        else:
            raise RecipeError(
                "say what to write",
                hint="--type Q4_K_M for a GGUF file, or --bits 4 for a GPTQ / "
                "compressed-tensors folder (or --recipe FILE)",
            )
    if fmt == "safetensors":
        raise _refuse("format", "safetensors (dense) is written by `qtool export`")
    if fmt == "mxfp4":
        for k in INT_ONLY + GGUF_ONLY + ("tokenizer_pre", "type", "smoothquant"):
            if k in o:
                raise _refuse(
                    k,
                    "does not apply to --format mxfp4 (E2M1 codes with a power-of-two scale "
                    "per 32 weights, on the MoE experts)",
                )
        out = {"format": "mxfp4"}
    elif fmt == "gguf":
        for k in INT_ONLY:
            if k in o:
                raise _refuse(
                    k,
                    "applies to integer outputs (--format gptq or compressed-tensors)",
                    hint="a GGUF file's grids are its types: --type Q4_K_M, --tensor-type",
                )
        if "type" not in o:
            raise RecipeError(
                "a GGUF output needs --type", hint="e.g. --type Q4_K_M (or Q8_0, Q4_0, F16...)"
            )
        out = _gguf_output(o, str(o["type"]))
    else:
        for k in GGUF_ONLY + ("tokenizer_pre", "type"):
            if k in o:
                raise _refuse(
                    k,
                    f"applies to GGUF output, not {fmt}",
                    hint="write a .gguf (--type ...) or drop it",
                )
        if "bits" not in o:
            raise RecipeError(f"{fmt} output needs --bits", hint="e.g. --bits 4")
        if not 2 <= int(o["bits"]) <= 8:
            raise _refuse("bits", f"{o['bits']}: must be between 2 and 8")
        gran = o.get("granularity")
        out = {
            "format": fmt,
            "bits": o["bits"],
            "group_size": o.get("group_size", 128),
            "sym": not o.get("asym", False),
            "restricted": bool(o.get("restricted", False)),
        }
        if gran is not None:
            out["granularity"] = gran
        if "act_bits" in o:
            if o["act_bits"] != 8:
                raise _refuse("act_bits", f"{o['act_bits']}: only 8-bit activations (W8A8)")
            out["activations"] = {"bits": 8, "dynamic": not o.get("act_static", False)}
        elif "act_static" in o or "smoothquant" in o:
            k = "act_static" if "act_static" in o else "smoothquant"
            raise _refuse(k, "quantizes activations", hint="add --act-bits 8")

    # -- stages --------------------------------------------------------------------------------
    stages: list[dict[str, Any]] = []
    if "smoothquant" in o:
        stages.append({"transform": "smoothquant", "alpha": o["smoothquant"]})
    if method == "gptq":
        stage = {"method": "gptq"}
        for k in GPTQ_ONLY + ("clip",):
            if k in o:
                stage[k] = o[k]
        stages.append(stage)
    else:
        for k in GPTQ_ONLY:
            if k in o:
                raise _refuse(k, "applies to --method gptq")
        stages.append({"method": "rtn", **({"clip": o["clip"]} if "clip" in o else {})})

    # -- calibration ---------------------------------------------------------------------------
    consumers = (
        method == "gptq"
        or "smoothquant" in o
        or "act_static" in o
        or (method == "rtn" and o.get("clip") == "mse" and fmt != "gguf")
        or o.get("imatrix") == "calibration"
    )
    calib: dict[str, Any] | None = None
    if any(k in o for k in CALIBRATION) or "stats" in o:
        if not consumers:
            k = next(k for k in (*CALIBRATION, "stats") if k in o)
            raise _refuse(
                k,
                "gives calibration data, which nothing here uses",
                hint="it feeds --method gptq, --smoothquant, --act-static, weighted --clip mse "
                "and --imatrix calibration",
            )
        if "stats" in o and method == "gptq" and "smoothquant" not in o:
            raise _refuse(
                "stats",
                "applies to --smoothquant, --act-static and RTN --clip mse",
                hint="GPTQ calibrates from --dataset",
            )
        calib = {k: o[k] for k in CALIBRATION if k in o}
        if "stats" in o:
            calib["stats"] = str(o["stats"])
    recipe: dict[str, Any] = {
        "stages": stages,
        "outputs": [_with_path(out, output_path)],
        "strict": bool(o.get("strict")),
    }
    if calib is not None:
        recipe["calibration"] = calib
    return _parse_options(recipe, o)


def _gguf_output(o: dict[str, Any], qtype: str) -> dict[str, Any]:
    out: dict[str, Any] = {"format": "gguf", "type": qtype}
    if "tensor_type" in o:
        out["tensor_types"] = list(o["tensor_type"])
    for k in ("output_tensor_type", "token_embedding_type", "tokenizer_pre"):
        if k in o:
            out[k] = o[k]
    if "pure" in o:
        out["pure"] = bool(o["pure"])
    if "imatrix" in o:
        out["imatrix"] = str(o["imatrix"])
    return out


def _with_path(out: dict[str, Any], path: str | None) -> dict[str, Any]:
    return {**out, "path": str(path)} if path is not None else out
