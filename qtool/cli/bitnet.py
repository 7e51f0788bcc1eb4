"""``qtool quantize --method bitnet``: BitNet b1.58 ternary weights as GGUF TQ1_0/TQ2_0 or as
transformers' BitNet safetensors layout; ``--bits 1``: the 1-bit sign/beta variant."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qtool.checkpoint import open_checkpoint
from qtool.errors import BadInputError
from qtool.io import check_writable
from qtool.output import get_output


def run_bitnet(
    src: str,
    output: Path | None,
    *,
    qtype: str | None,
    format: str | None,
    variant: str,
    tokenizer_pre: str | None,
    revision: str | None,
    json_out: bool,
) -> None:
    from qtool.quantize.bitnet import export_bitnet_gguf
    from qtool.quantize.formats.bitnet import write_bitnet_checkpoint

    out = get_output()
    out.json_mode = json_out
    if variant not in ("ternary", "binary"):
        raise BadInputError(
            "--method bitnet takes --bits 2 (ternary b1.58, the default) or --bits 1 (sign/beta)"
        )
    fmt = (format or ("safetensors" if variant == "binary" else "gguf")).lower()
    if fmt not in ("gguf", "safetensors"):
        raise BadInputError(f"--format {fmt}: BitNet writes gguf or safetensors")
    if variant == "binary" and fmt == "gguf":
        raise BadInputError(
            "GGUF has no 1-bit type", hint="use --format safetensors, or ternary (--bits 2)"
        )
    if output is None:
        raise BadInputError("no output", hint="pass -o FILE.gguf or -o FOLDER")
    check_writable(output)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(src, revision=revision)
    data: dict[str, Any] = {"source": src, "output": str(output), "variant": variant}
    if fmt == "gguf":
        qt = (qtype or "TQ2_0").upper()
        size, gammas = export_bitnet_gguf(ckpt, output, qt, out, tokenizer_pre=tokenizer_pre)
        data.update(format="gguf", type=qt, bytes=size, ternarized_tensors=len(gammas))
    else:
        if qtype is not None:
            raise BadInputError("--type applies to BitNet GGUF output (TQ1_0 or TQ2_0)")
        path = write_bitnet_checkpoint(ckpt, output, variant)  # type: ignore[arg-type]
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        data.update(format="safetensors", bytes=size)
    data["seconds"] = round(time.perf_counter() - t0, 2)
    out.result(
        data,
        lambda c: c.print(
            f"wrote {data['output']}: BitNet {variant} ({data['format']}"
            + (f" {data.get('type')}" if fmt == "gguf" else "")
            + f"), {data['bytes']:,} bytes in {data['seconds']:.1f} s"
        ),
    )
