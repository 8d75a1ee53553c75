"""The ``codelens`` command: run, status, schema, demo."""

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
        f"done: {outcome.tokens_run:,} tokens in {outcome.shards_run} shard(s), {outcome.seconds:.1f} s "
        f"({rate:,.0f} tokens/s) · {r.get('family')} on {r.get('device')} ({r.get('dtype')}), "
        f"lens impl {r.get('impl')}\nresults: {outcome.run_dir}",
        highlight=False,
    )


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Show a run's progress (works while the job runs and after it ends)."""
    from codelens.engine.output import RunDir

    rd = RunDir(run_dir)
    st = rd.read_status()
    if st is None:
        what = "no run directory" if not rd.path.exists() else "no _status.json (the job has not started)"
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
    files: Annotated[int, typer.Option(help="Standard-library files in the sample.")] = 24,
) -> None:
    """Run the main job on the embedded default: a local model over a stdlib sample."""
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
