"""Open a run directory for analysis: its rows and docs as DuckDB relations or Polars LazyFrames.

Only committed part files are read (those the manifest lists), so a run that is still going, or
one that crashed and left an orphan part, gives exactly the rows that ``summary.json`` and a
resumed run will count. Nothing is loaded into memory until a query asks for it.

    run = open_run("runs/demo/run")                     # DuckDB (default)
    run.rows.filter("layer = 4").aggregate("avg(target_logprob)")
    run = open_run("runs/demo/run", engine="polars")    # Polars LazyFrames
    run.rows.group_by("layer").agg(pl.col("target_rank").mean()).collect()
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from codelens.engine.errors import RunDirError
from codelens.engine.run.rundir import RunDir

ENGINES = ("duckdb", "polars")


@dataclass(frozen=True)
class RunTables:
    """A run opened for queries.

    Attributes:
        path: the run directory.
        rows: the lens rows of every committed shard (DuckDB relation or Polars LazyFrame).
        docs: ``docs.parquet`` (doc, source, n_tokens, status, language), same kind.
        summary: ``summary.json``, or None while the run has not finished.
        job: ``job.json``: the spec, what was resolved (family, impl, token-set ids) and versions.
        status: ``_status.json``: state (running, done, failed), shards done and total.
        connection: the DuckDB connection the relations belong to (None for Polars): run SQL
            on it, e.g. ``run.connection.sql("SELECT ... FROM rows")``, where ``rows`` and
            ``docs`` are registered views.
    """

    path: Path
    rows: Any
    docs: Any
    summary: dict[str, Any] | None
    job: dict[str, Any]
    status: dict[str, Any] | None
    connection: Any = None


def _import(engine: str) -> Any:
    try:
        return __import__(engine)
    except ImportError:
        other = "polars" if engine == "duckdb" else "duckdb"
        raise RunDirError(
            f"open_run(engine={engine!r}) needs {engine}, which is not installed: "
            f"pip install {engine} (or choose engine={other!r})"
        ) from None


def open_run(run_dir: str | Path, *, engine: Literal["duckdb", "polars"] = "duckdb") -> RunTables:
    """Open ``run_dir`` (what ``codelens run`` wrote) for queries.

    Args:
        run_dir: the run directory (``output.dir`` of the job).
        engine: ``duckdb`` (relations on a fresh in-memory connection, with the views ``rows``
            and ``docs``) or ``polars`` (LazyFrames).

    Raises:
        RunDirError: not a run directory, no shard committed yet, or the engine is not installed.
    """
    if engine not in ENGINES:
        raise RunDirError(f"open_run: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    run = RunDir(Path(run_dir))
    job = run.read_job()
    if job is None:
        raise RunDirError(
            f"{run.path} is not a run directory (no job.json): give the output.dir of a job "
            "that `codelens run` started"
        )
    parts = [str(run.part_path(shard)) for shard in sorted(run.committed())]
    if not parts:
        raise RunDirError(
            f"{run.path} has no committed shard yet: wait for `codelens run` to commit one "
            f"(`codelens status {run.path}` shows progress)"
        )
    summary = json.loads(run.summary_file.read_text()) if run.summary_file.exists() else None
    tables: dict[str, Any] = dict(path=run.path, summary=summary, job=job, status=run.read_status())
    if engine == "duckdb":
        duckdb = _import("duckdb")
        con = duckdb.connect()
        rows, docs = con.read_parquet(parts), con.read_parquet(str(run.docs_file))
        rows.create_view("rows")
        docs.create_view("docs")
        return RunTables(rows=rows, docs=docs, connection=con, **tables)
    pl = _import("polars")
    return RunTables(rows=pl.scan_parquet(parts), docs=pl.scan_parquet(run.docs_file), **tables)
