"""The README.md model card of a quantized checkpoint folder."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtool.formats.folder import WriteRequest, WriteResult

LOADERS = {
    "gptq": "transformers (`AutoModelForCausalLM.from_pretrained`, with GPTQModel installed), "
    "GPTQModel, AutoGPTQ, vLLM, text-generation-inference; `qtool eval` (its own unpacker when "
    "GPTQModel is absent)",
    "pack-quantized": "transformers with the `compressed-tensors` package (CPU and GPU), vLLM, "
    "`qtool eval`",
    "int-quantized": "vLLM (int8 W8A8 kernels), transformers with the `compressed-tensors` "
    "package (CPU: runs the int8 activation fake-quantization), `qtool eval`",
}


def _granularity(req: WriteRequest) -> str:
    s = req.scheme
    if s.granularity == "group":
        return f"group of {s.group_size}"
    return "per output channel" if s.granularity == "channel" else "per tensor"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def model_card(req: WriteRequest, fmt: str, res: WriteResult, *, desc_act: bool) -> str:
    """Markdown: what was done, how well it does, how big it is, how to load and redo it."""
    from qtool import __version__

    s = req.scheme
    layout = fmt if fmt == "gptq" else str(res.quantization_config.get("format"))
    acts = req.activations
    act = "none (weights only)"
    if acts is not None:
        act = "int8 " + ("dynamic per-token" if acts.dynamic else "static per-tensor") + " (sym)"
    card = req.card
    calib = "none (round-to-nearest needs no data)" if req.method == "rtn" else "—"
    if card.get("dataset"):
        calib = (
            f"{card['dataset']}, {card.get('samples', '?')} samples × "
            f"{card.get('seq_len', '?')} tokens"
        )
    rows = [
        ("method", req.method),
        ("format", f"{'GPTQ v1' if fmt == 'gptq' else 'compressed-tensors'} ({layout})"),
        ("bits", str(s.bits)),
        ("granularity", _granularity(req)),
        ("symmetric", "yes" if s.sym else "no"),
        ("act-order (desc_act)", "yes" if desc_act else "no"),
        ("range / clipping", f"{'restricted' if s.restricted else 'full'} / {s.clip}"),
        ("activations", act),
        ("calibration", calib),
        ("quantized linears", str(len(req.weights))),
    ]
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [qtool, {fmt}, {s.bits}-bit]",
        "---",
        "",
        f"# {req.out_dir.name}",
        "",
        f"`{req.source.source}` quantized by qtool {__version__}.",
        "",
        "## Quantization",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Quality",
        "",
    ]
    if res.quality:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in res.quality.items():
            if isinstance(v, float):
                val = f"{v:.6g}"
            else:
                val = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
            lines.append(f"| {k} | {val} |")
    else:
        lines.append("not measured")
    src_bytes = sum(t.nbytes for t in req.source.tensors.values())
    lines += [
        "",
        "## Footprint",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {res.params:,} |",
        f"| tensor data | {_mib(res.tensor_bytes)} ({res.bits_per_weight:.3f} bits/weight) |",
        f"| source tensor data | {_mib(src_bytes)} |",
        "",
        "Embeddings, norms and the output head stay in their source dtype.",
        "",
        "## Loading",
        "",
        f"Read by: {LOADERS.get(layout, LOADERS['gptq'])}.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{req.out_dir.name}")',
        "```",
        "",
    ]
    if card.get("notes"):
        lines += ["## Notes", "", str(card["notes"]), ""]
    if req.recipe is not None:
        lines += [
            "## Reproduce",
            "",
            "`recipe.json` beside this card is the resolved recipe; running it again on the same "
            "source gives the same files:",
            "",
            "```sh",
            f"qtool quantize {req.source.source} --recipe recipe.json -o OUT",
            "```",
            "",
        ]
    return "\n".join(lines)
