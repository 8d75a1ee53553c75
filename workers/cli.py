"""The ``codelens`` command: run, status, schema, demo, report, plot, bench, compare."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from codelens.engine.errors import CodelensError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Corpus-scale logit lens for code LLMs: per-token, per-layer statistics as Parquet.",
)
err = Console(stderr=True, soft_wrap=True)
out = Console()


def _fail(e: CodelensError, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a spec field: --set lens.k=5 (repeatable)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the results of a different job in output.dir.")
    ] = False,
) -> None:
    """Run (or resume) a job: rerunning the same command skips committed shards."""
    from codelens.engine.schemas import load_spec
    from codelens.workers.job import JobFailedError, run_job

    try:
        spec = load_spec(job, set_ or [])
        outcome = run_job(spec, overwrite=overwrite)
    except JobFailedError as e:
        _fail(e, code=1)
    except CodelensError as e:
        _fail(e)
    if outcome.state == "nothing to do":
        err.print(f"{outcome.run_dir}: every shard is committed; nothing to do.")
        return
    _print_outcome(outcome)


def _print_outcome(outcome) -> None:
    rate = outcome.tokens_run / outcome.seconds if outcome.seconds else 0.0
    r = outcome.resolved
    err.print(
        f"done: {outcome.tokens_run:,} tokens in {outcome.shards_run} shard(s), "
        f"{outcome.seconds:.1f} s ({rate:,.0f} tokens/s) · {r.get('family')} on {r.get('device')} "
        f"({r.get('dtype')}), lens impl {r.get('impl')}\nresults: {outcome.run_dir}",
        highlight=False,
    )


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Show a run's progress (works while the job runs and after it ends)."""
    from codelens.engine.run.rundir import RunDir

    rd = RunDir(run_dir)
    st = rd.read_status()
    if st is None:
        what = (
            "no run directory"
            if not rd.path.exists()
            else "no _status.json (the job has not started)"
        )
        err.print(f"[bold red]error:[/] {run_dir}: {what}")
        raise typer.Exit(2)
    table = Table(show_header=False, box=None)
    pct = 100 * st["tokens_done"] / st["tokens_total"] if st["tokens_total"] else 100.0
    eta = st.get("eta_s")
    rows = [
        ("state", st["state"]),
        ("tokens", f"{st['tokens_done']:,} / {st['tokens_total']:,} ({pct:.1f}%)"),
        ("shards", f"{st['shards_done']} / {st['shards_total']}"),
        ("tokens/s", f"{st['tokens_per_s']:,.1f}"),
        ("ETA", "-" if eta is None else f"{eta:,.0f} s"),
        ("retries", str(st.get("retries", 0))),
        ("updated", st["updated_at"]),
    ]
    if st.get("workers_alive") is not None:
        rows.append(("workers alive", str(st["workers_alive"])))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    for f in st.get("failures", []):
        out.print(f"[red]failed[/] shard {f['shard']}: {f['error']}", highlight=False)
    if st["state"] == "failed":
        raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the job spec's JSON Schema."""
    from codelens.engine.schemas import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Where to put the demo model, job and run.")],
    files: Annotated[
        int, typer.Option(help="Held-out files per language (Python, C, Perl, shell).")
    ] = 6,
) -> None:
    """Run the main job on the embedded default: the bundled model over held-out code."""
    from codelens.workers.demo import run_demo

    try:
        outcome, summary = run_demo(out_dir, n_files=files)
    except CodelensError as e:
        _fail(e)
    if outcome.state != "nothing to do":
        _print_outcome(outcome)
    table = Table(title="per-layer lens (demo corpus)")
    for col in ("layer", "top-1 acc", "mean logprob", "median rank", "KL to final", "entropy"):
        table.add_column(col, justify="right")
    for row in summary["layers"]:

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        table.add_row(
            str(row["layer"]),
            fmt(row["top1_accuracy"]),
            fmt(row["mean_target_logprob"]),
            str(row["target_rank_quantiles"]["p50"]),
            fmt(row["mean_kl_final"]),
            fmt(row["mean_entropy"]),
        )
    out.print(table)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (with summary.json).")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write index.html and figures [RUN_DIR/report].")
    ] = None,
) -> None:
    """Write an HTML report (figures and tables) of a finished run to RUN_DIR/report/."""
    from codelens.engine.analysis.report import build_report

    try:
        index = build_report(run_dir, out)
    except CodelensError as e:
        _fail(e)
    err.print(f"report: {index}", highlight=False)


@app.command()
def plot(
    model: Annotated[
        Path,
        typer.Option(
            help="Local model directory, or OWNER/NAME in the local Hugging Face cache (as "
            "model.path in a job)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output file: .png (a figure) or .html (a table).")],
    text: Annotated[str | None, typer.Option(help="The text to look at.")] = None,
    file: Annotated[Path | None, typer.Option(help="Read the text from this file.")] = None,
    lines: Annotated[
        str | None, typer.Option(help="With --file: only lines A-B (1-based, inclusive).")
    ] = None,
    metric: Annotated[
        str, typer.Option(help="Cell colour: logprob | rank (of the next token) | kl | entropy.")
    ] = "logprob",
    bos: Annotated[bool, typer.Option(help="Prepend the BOS token, as jobs do by default.")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    revision: Annotated[
        str | None, typer.Option(help="With a repo id: branch, tag or commit (default main).")
    ] = None,
) -> None:
    """Per-prompt logit-lens grid: layers x positions, each cell the layer's top-1 next token."""
    from codelens.engine.analysis.grid import METRICS, PlotError, compute_grid, read_lines
    from codelens.engine.model.loading import load_model

    try:
        if (text is None) == (file is None):
            raise PlotError("give exactly one of --text STR or --file PATH")
        if lines is not None and file is None:
            raise PlotError("--lines needs --file")
        if metric not in METRICS:
            raise PlotError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
        kind = out.suffix.lower()
        if kind not in (".png", ".html"):
            raise PlotError(f"--out {out}: the file name must end in .png or .html")
        first_line = 1
        if file is not None:
            text, first_line = read_lines(file, lines)
        assert text is not None
        loaded = load_model(model, revision=revision, dtype=dtype, device=device)
        grid = compute_grid(loaded, text, add_bos=bos, first_line=first_line)
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == ".png":
            from codelens.engine.analysis.grid import render_png

            render_png(grid, metric, out)
        else:
            from codelens.engine.analysis.grid import render_html

            render_html(grid, metric, out)
    except CodelensError as e:
        _fail(e)
    shape = f"{len(grid.token_ids)} tokens x {len(grid.layers)} layers"
    err.print(f"plot: {out} ({shape})", highlight=False)


@app.command()
def bench(
    model: Annotated[
        Path,
        typer.Option("--model", help="Local model directory, or OWNER/NAME in the local HF cache."),
    ],
    tokens: Annotated[int, typer.Option(help="Tokens to time (random ids).")] = 512,
    seq_len: Annotated[int, typer.Option(help="Tokens per forward pass.")] = 512,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    revision: Annotated[
        str | None, typer.Option(help="With a repo id: branch, tag or commit (default main).")
    ] = None,
) -> None:
    """The lens's cost per token on your model and device: lens vs forward vs the matmul bound."""
    from codelens.engine.model.loading import load_model
    from codelens.workers.bench import bench_tokens, run_codelens, run_matmul

    try:
        loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    except CodelensError as e:
        _fail(e)
    ids = bench_tokens(loaded.parts.head.vocab_size, tokens)
    sequences = [ids[i : i + seq_len] for i in range(0, tokens, seq_len)]
    run_codelens(loaded, sequences[0][:32])  # warm-up, discarded
    runs = [run_codelens(loaded, s) for s in sequences]
    bound = run_matmul(loaded, ids)
    forward_s = sum(r.forward_s for r in runs)
    lens_s = sum(r.lens_s for r in runs)
    n_layers = len(loaded.parts.blocks) + 1
    table = Table(
        title=(
            f"lens cost: {loaded.family}, {tokens} tokens x {n_layers} layers, {loaded.device}, "
            f"{str(loaded.dtype).removeprefix('torch.')}"
        )
    )
    table.add_column("stage")
    for col in ("seconds", "per token", "tokens/s"):
        table.add_column(col, justify="right")
    for name, secs in (
        ("forward (capture)", forward_s),
        ("lens (all statistics)", lens_s),
        ("matmul bound", bound.lens_s),
    ):
        table.add_row(
            name, f"{secs:.3f}", f"{1e6 * secs / tokens:,.1f} us", f"{tokens / secs:,.0f}"
        )
    out.print(table)
    out.print(
        f"lens / forward = {lens_s / forward_s:.2f}; the lens runs at "
        f"{bound.lens_s / lens_s:.0%} of the bare [rows, d] x [d, V] matmul speed; "
        f"lens working memory {max(r.peak_mem_bytes for r in runs) / 2**20:,.0f} MiB",
        highlight=False,
        markup=False,
    )


@app.command()
def compare(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Finished run directories (with summary.json): two or more, or one with "
            "--with-default."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where to write index.html and compare.png.")],
    allow_different_corpora: Annotated[
        bool,
        typer.Option(
            "--allow-different-corpora",
            help="Compare runs whose docs.parquet differ (different documents or token counts).",
        ),
    ] = False,
    with_default: Annotated[
        bool,
        typer.Option(
            "--with-default",
            help="Also run the bundled default model over the first run's corpus (into "
            "OUT/default-run; resumed if there) and draw it beside the others.",
        ),
    ] = False,
) -> None:
    """Overlay several runs' per-layer curves on a relative-depth axis (layer / L)."""
    from codelens.engine.analysis.compare import build_comparison

    try:
        if with_default:
            from codelens.workers.demo import default_model_beside

            run_dirs = [*run_dirs, default_model_beside(run_dirs[0], out)]
        index = build_comparison(run_dirs, out, allow_different_corpora=allow_different_corpora)
    except CodelensError as e:
        _fail(e)
    err.print(f"comparison: {index}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own progress bar and status file report progress; transformers' per-file bars
    # ("Loading weights", "Writing model shards") would only interleave with it.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    app()


if __name__ == "__main__":
    main()
