"""``qtool eval``'s table and its bits-per-weight vs KLD plot."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qtool.io import atomic_file


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def short_labels(sources: list[str]) -> list[str]:
    """File or folder names (Hub ids as they are); full paths where two names collide."""
    names = {x: Path(x).name if Path(x).expanduser().exists() else x for x in sources}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return [names[x] if names[x] not in clash else x for x in sources]


def render(console: Console, d: dict[str, Any]) -> None:
    """One table: artifact, size on disk, bits per weight, PPL, ΔPPL, KLD, top-1."""
    st, tok = d["settings"], d["tokens"]
    labels = short_labels([d["base"]["source"]] + [r["source"] for r in d["artifacts"]])
    t = Table(
        title=f"{st['dataset']}: {st['chunks']} windows of {st['ctx']} tokens, "
        f"{tok['scored']} scored ({st['scoring']} windows), against {labels[0]}",
        title_justify="left",
    )
    t.add_column("artifact")
    t.add_column("size", justify="right")
    t.add_column("bits/weight", justify="right")
    t.add_column("PPL", justify="right")
    t.add_column("ΔPPL", justify="right")
    t.add_column("KLD mean", justify="right")
    t.add_column("KLD p99", justify="right")
    t.add_column("top-1", justify="right")
    b = d["base"]
    t.add_row(
        f"{labels[0]} (base)",
        _size(b["size_bytes"]),
        _num(b["bits_per_weight"], ".3f"),
        _num(b["ppl"], ".4f"),
        "",
        "",
        "",
        "",
    )
    for r, name in zip(d["artifacts"], labels[1:], strict=True):
        label = name + (" [llama.cpp]" if r["backend"] == "llama.cpp" else "")
        t.add_row(
            label,
            _size(r["size_bytes"]),
            _num(r["bits_per_weight"], ".3f"),
            _num(r["ppl"], ".4f"),
            _num(r["delta_ppl"], "+.4f"),
            _num(r["kld"]["mean"], ".6f"),
            _num(r["kld"]["p99"], ".5f"),
            _num(100 * r["top1"], ".2f") + "%",
        )
    console.print(t)
    tm = d["timing"]
    console.print(
        f"[dim]PPL over the scored tokens; KLD = KL(base || artifact) per token, nats; top-1 = "
        f"same argmax as the base. {tm['tokens_per_second']:.0f} tokens/s "
        f"({st['device']}, {st['dtype']}).[/dim]"
    )


def plot(d: dict[str, Any], path: Path) -> None:
    """Bits per weight against mean KLD, one labelled point per artifact, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = d["artifacts"]
    xs = [r["bits_per_weight"] for r in rows]
    ys = [r["kld"]["mean"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(xs, ys, zorder=3)
    names = short_labels([r["source"] for r in rows])
    for name, x, y in zip(names, xs, ys, strict=True):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(x=0.25, y=0.12)  # room for the labels right of the points
    if ys and all(y > 0 for y in ys) and max(ys) / min(ys) > 20:
        ax.set_yscale("log")  # quantization levels span orders of magnitude of KLD
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KL divergence vs base (nats)")
    st = d["settings"]
    base = short_labels([st["base"]])[0]
    ax.set_title(f"{base} on {st['dataset']} (ctx {st['ctx']})", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_file(path) as f:
        f.write(buf.getvalue())
