"""``qtool calibrate``: activation statistics and an importance matrix, one layer at a time."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qtool.calibrate.imatrix import save_imatrix
from qtool.calibrate.layerwise import Progress
from qtool.calibrate.pipeline import CalibrateOptions, calibrate, imatrix_of, prepare
from qtool.calibrate.stats import outlier_rows
from qtool.calibrate.statsfile import save_stats
from qtool.cli.options import JsonFlag, Revision, Source
from qtool.errors import BadInputError
from qtool.io import check_writable
from qtool.output import Output, get_output


class StageBars(Progress):
    """Progress on stderr: on a terminal two bars, the stages (embeddings, each layer, norm)
    with the overall ETA and the batches of the current stage; elsewhere (logs, CI) one line
    per stage with its time and the ETA."""

    def __init__(self, out: Output, bar: Any) -> None:
        self.out = out
        self.bar = bar
        self.live = bar is not None
        self.total_task: Any = None
        self.stage_task: Any = None
        self.t0 = time.perf_counter()
        self.done = 0
        self.total = 0

    def stage(self, name: str, index: int, total: int, batches: int) -> None:
        self.total = total
        if not self.live:
            return
        if self.total_task is None:
            self.total_task = self.bar.add_task("layers", total=total)
        if self.stage_task is None:
            self.stage_task = self.bar.add_task(name, total=batches)
        else:
            self.bar.reset(self.stage_task, total=batches, description=name)

    def batch(self) -> None:
        if self.live:
            self.bar.advance(self.stage_task)

    def stage_done(self, name: str, seconds: float) -> None:
        self.done += 1
        if self.live:
            self.bar.advance(self.total_task)
            self.out.debug(f"{name}: {seconds:.2f} s")
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        self.out.info(f"{name}: {seconds:.1f} s [{self.done}/{self.total}, eta {eta:.0f} s]")


def calibrate_cmd(
    src: Source,
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            "-d",
            help="A named set (wikitext2, c4, pile-val, canterbury), a local "
            ".txt/.jsonl/.parquet/.csv file or folder, or a Hub spec "
            "org/name[:config]:split[:field].",
        ),
    ] = "wikitext2",
    samples: Annotated[
        int, typer.Option("--samples", "-n", help="Samples (windows) to run.")
    ] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", "-L", help="Tokens per sample.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Picks the windows (deterministic).")] = 0,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Stats file (safetensors + JSON metadata) \\[default: ./MODEL.calib.safetensors]",
        ),
    ] = None,
    imatrix: Annotated[
        Path | None,
        typer.Option(
            "--imatrix",
            help="Also write llama.cpp's importance matrix "
            "(GGUF; the legacy format if FILE ends in .dat).",
        ),
    ] = None,
    imatrix_output: Annotated[
        bool,
        typer.Option(
            "--imatrix-output",
            help="Include output.weight in the imatrix (llama-imatrix's --process-output).",
        ),
    ] = False,
    text_field: Annotated[
        str | None,
        typer.Option(
            "--text-field",
            help="Column holding the text \\[default: text, or the only string column].",
        ),
    ] = None,
    dataset_revision: Annotated[
        str | None,
        typer.Option("--dataset-revision", help="Hub dataset branch, tag or commit (Hub specs)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="Tokenizer folder or Hub id \\[default: the model's]."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per forward.")] = 1,
    device: Annotated[
        str, typer.Option("--device", help="auto (GPU if present), cpu, cuda, cuda:N.")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16, float16.")
    ] = "float32",
    hessian: Annotated[
        bool,
        typer.Option("--hessian", help="Also store GPTQ's Σ x xᵀ per distinct input (large)."),
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Rows in the outlier table.")] = 10,
    outlier_factor: Annotated[
        float,
        typer.Option(
            "--outlier-factor", help="A channel is an outlier above this x median absmax."
        ),
    ] = 20.0,
    revision: Revision = None,
    json_out: JsonFlag = False,
) -> None:
    """Collect activation statistics and an importance matrix, one decoder layer at a time.

    Examples:

      qtool calibrate ./smollm2 -d canterbury -n 64 -L 512 --imatrix smollm2.imatrix.gguf

      qtool calibrate meta-llama/Llama-3.1-8B -d wikitext2 -o llama.calib.safetensors --json
    """
    out = get_output()
    out.json_mode = json_out
    stats_path = output or Path(f"{_stem(src)}.calib.safetensors")
    check_writable(stats_path)
    if imatrix is not None:
        check_writable(imatrix)
        if imatrix.expanduser().resolve() == stats_path.expanduser().resolve():
            raise BadInputError(f"--imatrix {imatrix}: the same path as the stats file")
    if top < 0 or outlier_factor <= 1:
        raise BadInputError("--top must be >= 0 and --outlier-factor > 1")
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
    )
    t0 = time.perf_counter()
    prep = prepare(src, opts, revision=revision)
    for note in prep.notes:
        out.warn(note)
    if hessian:
        sp = prep.spec
        inter = sp.intermediate or 4 * sp.hidden
        per_layer = 2 * sp.hidden**2 + (sp.n_heads * sp.head_dim) ** 2 + inter**2
        size = 4 * per_layer * sp.n_layers
        if size > 2 * 2**30:
            out.warn(
                f"--hessian keeps {size / 2**30:.1f} GiB of Σ x xᵀ in memory and in the stats "
                "file (float32, one per distinct input)"
            )
    d = prep.dataset
    out.info(
        f"calibrating {prep.ckpt.source}: {d['samples']} samples x {d['seq_len']} tokens of "
        f"{d['spec']} ({d['stream_tokens']:,} tokens, {d['windows_available']} windows; "
        f"tokens sha256 {d['tokens_sha256'][:16]})"
    )
    live = out.show_progress and out.stderr.is_terminal
    with out.progress() if live else contextlib.nullcontext() as bar:
        cal = calibrate(prep, opts, progress=StageBars(out, bar))
    im = imatrix_of(cal, include_output=imatrix_output) if imatrix is not None else None
    save_stats(stats_path, cal)
    if im is not None and imatrix is not None:
        try:
            save_imatrix(imatrix, im)
        except BaseException:
            stats_path.unlink(missing_ok=True)  # both outputs or neither
            raise
    out.info(f"wrote {stats_path}" + (f" and {imatrix}" if imatrix else ""))
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
        "outlier_factor": outlier_factor,
        "outliers": rows,
    }
    out.result(data, lambda console: render(console, data))


def _stem(src: str) -> str:
    p = Path(src)
    name = p.name if p.exists() else src.rstrip("/").split("/")[-1]
    return (p.stem if p.suffix in (".gguf", ".safetensors") else name) or "model"


def render(console: Console, d: dict[str, Any]) -> None:
    """The human report: what was measured, and the most outlier-heavy inputs."""
    ds = d["dataset"]
    head = Table(title=d["model"], show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    revision = ds.get("resolved_revision") or ds.get("revision")
    rows = [
        ("dataset", ds["spec"] + (f" @ {revision[:12]}" if revision else "")),
        ("samples", f"{ds['samples']} x {ds['seq_len']} tokens (seed {ds['seed']})"),
        ("tokens seen", f"{d['tokens_seen']:,}"),
        ("tokens sha256", ds["tokens_sha256"]),
        ("linear layers", str(d["linear_layers"])),
        ("device / dtype", f"{d['device']} / {d['dtype']}"),
        ("time", f"{d['seconds']:.1f} s"),
        ("stats file", d["stats_file"]),
    ]
    if d["imatrix_file"]:
        rows.append(("imatrix", f"{d['imatrix_file']} ({d['imatrix_entries']} entries)"))
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    t = Table(
        title=f"Most outlier-heavy inputs (outlier: channel absmax > {d['outlier_factor']:g} x "
        "median)",
        title_justify="left",
    )
    for col, just in (
        ("layer input", "left"),
        ("channels", "right"),
        ("max absmax", "right"),
        ("median", "right"),
        ("max/median", "right"),
        ("outliers", "right"),
        ("top channel", "right"),
        ("p99.9 |x|", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in d["outliers"]:
        t.add_row(
            r["layer"],
            str(r["in_features"]),
            f"{r['max_absmax']:.3g}",
            f"{r['median_absmax']:.3g}",
            f"{r['ratio']:.1f}",
            str(r["outlier_channels"]),
            str(r["top_channel"]),
            f"{r['p99_9']:.3g}",
        )
    console.print(t)
