"""Run a job end to end: prepare the run directory, plan, execute, commit, summarise.

Resume is the default: shards already in ``_manifest.jsonl`` are skipped, so running the same
command again after a crash (or a Ctrl-C) finishes the job, and running a finished job again
writes nothing.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from codelens.engine.data.plan import iter_shards, plan_corpus
from codelens.engine.errors import CodelensError
from codelens.engine.model.loading import load_tokenizer
from codelens.engine.run.aggregates import finalize, merge_partials
from codelens.engine.run.lock import DriverLock
from codelens.engine.run.rundir import RunDir, write_json_atomic
from codelens.engine.schemas import JobSpec
from codelens.workers.executor import Executor
from codelens.workers.progress import ProgressTracker
from codelens.workers.worker import ShardResult


class JobFailedError(CodelensError):
    """Some shards failed; the others are committed and a rerun retries only the failed ones."""


@dataclass
class JobOutcome:
    """What a run did."""

    run_dir: Path
    state: str
    """'done', or 'nothing to do' for a finished job run again."""
    shards_run: int = 0
    tokens_run: int = 0
    seconds: float = 0.0
    resolved: dict[str, Any] = field(default_factory=dict)


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Versions recorded in job.json (and in benchmark results, with ``extra`` distributions)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        *extra,
        "code-llm-lens",
        "torch",
        "transformers",
        "accelerate",
        "tokenizers",
        "pyarrow",
        "pydantic",
        "triton",
        "ray",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def make_executor(spec: JobSpec) -> Executor:
    """The executor for ``execution.backend`` (Ray is imported only when asked for)."""
    if spec.execution.backend == "local":
        from codelens.workers.local import LocalExecutor

        return LocalExecutor(spec)
    from codelens.workers.ray_backend import RayExecutor  # the only module that imports ray

    return RayExecutor(spec)


def write_summary(
    run_dir: RunDir, spec: JobSpec, docs_status: dict[str, int], resolved: dict[str, Any]
) -> dict:
    """Merge every committed shard's partials, in shard order, into summary.json.

    Merging in shard order (not commit order) fixes the float summation order, so executors that
    commit shards in different orders (local, Ray) write identical numbers.
    """
    entries = run_dir.committed()
    merged = merge_partials(
        entry["partials"] for entry in sorted(entries.values(), key=lambda e: e["shard"])
    )
    try:
        pygments_version: str | None = importlib.metadata.version("pygments")
    except importlib.metadata.PackageNotFoundError:
        pygments_version = None
    summary = {
        "name": spec.name,
        "model_family": resolved.get("family"),
        "n_blocks": resolved.get("n_blocks"),
        "shards": len(entries),
        "tokens": sum(entry["n_tokens"] for entry in entries.values()),
        "docs_by_status": docs_status,
        "lookahead_offsets": list(spec.lens.lookahead),
        "token_sets": list(spec.lens.token_sets),
        # Categories come from Pygments' lexers: another version may classify some tokens
        # differently, so the version is part of what these numbers mean.
        "syntax": {"pygments": pygments_version},
        **finalize(merged, spec.lens.lookahead),
    }
    write_json_atomic(run_dir.summary_file, summary)
    return summary


def run_job(
    spec: JobSpec,
    *,
    overwrite: bool = False,
    show_progress: bool | None = None,
    executor: Executor | None = None,
) -> JobOutcome:
    """Run (or resume) ``spec``; raises ``JobFailedError`` if any shard failed.

    Args:
        spec: the validated job.
        overwrite: replace the results of a different job in ``output.dir``.
        show_progress: draw a progress bar (default: when stderr is a terminal).
        executor: what computes the shards, not yet started (default: ``make_executor(spec)``,
            from ``execution.backend``). ``run_job`` starts it and shuts it down (it is never
            started when every shard is already committed).
    """
    started = time.perf_counter()
    run_dir = RunDir(spec.output.dir)
    stale = run_dir.prepare(spec.fingerprint(), spec.name, overwrite=overwrite)
    # One driver per run directory: a second one would run every shard again.
    with DriverLock(run_dir.path):
        return _run_locked(spec, run_dir, stale, started, show_progress, executor)


def _run_locked(
    spec: JobSpec,
    run_dir: RunDir,
    stale: bool,
    started: float,
    show_progress: bool | None,
    executor: Executor | None,
) -> JobOutcome:
    """``run_job`` once the run directory is prepared and this driver holds its lock."""
    tokenizer = load_tokenizer(
        spec.model.path,
        revision=spec.model.revision,
        allow_pickle=spec.model.allow_pickle,
        trust_remote_code=spec.model.trust_remote_code,
    )
    plan = plan_corpus(spec, tokenizer)
    committed = {} if stale else run_dir.committed()
    pending = [i for i in range(len(plan.shard_tokens)) if i not in committed]
    docs_status: dict[str, int] = {}
    for status in plan.docs.column("status").to_pylist():
        key = "ok" if status == "ok" else status.split(":")[0]
        docs_status[key] = docs_status.get(key, 0) + 1

    if not pending and run_dir.summary_file.exists():
        return JobOutcome(run_dir.path, "nothing to do")

    if executor is None:
        executor = make_executor(spec)
    resolved: dict[str, Any] = {}
    try:
        if pending:
            resolved = executor.start()
        else:
            resolved = (run_dir.read_job() or {}).get("resolved", {})
        if stale:
            run_dir.clear()  # only now: the new job has planned and loaded its model
        # Parts a killed driver's workers wrote and nobody committed (this driver holds the lock).
        run_dir.clear_staging()
        if not run_dir.docs_file.exists():
            run_dir.write_docs(plan.docs)
        if pending:
            _write_job(run_dir, spec, resolved, plan.n_tokens, len(plan.shard_tokens))

        def commit(result: ShardResult) -> None:
            if result.staged is not None:  # a Ray worker wrote the part and encoded its line
                run_dir.commit_part(result.index, result.staged, result.manifest_line)
            else:
                run_dir.commit_shard(result.index, result.table, result.manifest_entry())

        done_tokens = sum(plan.shard_tokens[i] for i in committed)
        tracker = ProgressTracker(
            run_dir,
            tokens_total=plan.n_tokens,
            shards_total=len(plan.shard_tokens),
            tokens_done=done_tokens,
            shards_done=len(committed),
            show_bar=show_progress,
        )
        with tracker:
            todo = set(pending)
            shards = (s for s in iter_shards(spec, tokenizer, plan.token_counts) if s.index in todo)
            executor.run(shards, commit, tracker)
            run_dir.clear_staging()  # what is left there are parts of dropped attempts
            write_summary(run_dir, spec, docs_status, resolved)
            failures = [f for f in tracker.failures if f["shard"] is not None]
            tracker.finish("failed" if failures else "done")
    finally:
        executor.shutdown()
    if failures:
        listed = "; ".join(f"shard {f['shard']}: {f['error']}" for f in failures)
        raise JobFailedError(
            f"{len(failures)} shard(s) failed ({listed}). The other shards are committed; run the "
            "same command again to retry only the failed ones."
        )
    return JobOutcome(
        run_dir.path,
        "done",
        shards_run=len(pending),
        tokens_run=plan.n_tokens - done_tokens,
        seconds=time.perf_counter() - started,
        resolved=resolved,
    )


def _write_job(
    run_dir: RunDir, spec: JobSpec, resolved: dict[str, Any], n_tokens: int, n_shards: int
) -> None:
    write_json_atomic(
        run_dir.job_file,
        {
            "name": spec.name,
            "fingerprint": spec.fingerprint(),
            "spec": spec.model_dump(mode="json"),
            "resolved": resolved,
            "plan": {"tokens": n_tokens, "shards": n_shards},
            "versions": package_versions(),
            "command": sys.argv,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
