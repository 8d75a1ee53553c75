"""The interface every executor implements: ``run_job`` drives a job through it alone.

An executor decides *where* shards are computed (this process, Ray actors, ...); the driver
(``codelens.workers.job.run_job``) owns planning, the run directory and every write to it. Keeping
that split behind one small interface lets ``run_job`` treat every backend alike and lets tests
hand it an executor of their own (one whose workers fail on purpose, for instance).

Implementations match it structurally (no base class to inherit): ``LocalExecutor`` in
``codelens.workers.local``, ``RayExecutor`` in ``codelens.workers.ray_backend``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from codelens.engine.data.windows import Shard
from codelens.workers.progress import ProgressTracker
from codelens.workers.worker import ShardResult


@runtime_checkable
class Executor(Protocol):
    """Computes a job's shards on some set of workers; ``run_job`` calls start, run, shutdown.

    ``run_job`` calls ``start`` once (only when shards are pending), then ``run`` at most once,
    and always ``shutdown`` at the end, whether ``start`` or ``run`` raised or not.
    """

    def start(self) -> dict[str, Any]:
        """Bring the workers up and load the job's model in each of them.

        Must return what the worker resolved (family, model class, device, dtype, lens impl,
        n_blocks, ...: ``LensWorker.load``'s dict, plus anything backend-specific), which
        ``run_job`` records in job.json and summary.json.

        Raises:
            CodelensError: the job cannot start (model fails to load, no resources, ...).
        """
        ...

    def run(
        self,
        shards: Iterable[Shard],
        commit: Callable[[ShardResult], None],
        tracker: ProgressTracker,
    ) -> None:
        """Compute every shard of ``shards`` and hand each completed one to ``commit``.

        Must call ``commit(result)`` exactly once per completed shard, in the driver's process
        (the manifest is written by the driver only; a worker may have written the part file
        itself, to a ``RunDir.staging_path``, and say so in ``result.staged``), and
        ``tracker.shard_done`` after it. A
        shard that cannot be computed is recorded with ``tracker.shard_failed(index, error,
        final=True)`` and the others go on; ``tracker.workers_alive`` says how many workers
        are up. ``shards`` may be consumed lazily.

        Raises:
            CodelensError: a problem with the job itself (not with one shard's data) stops it.
        """
        ...

    def shutdown(self) -> None:
        """Release every worker, model and resource that ``start`` acquired.

        Must be safe to call after a failed (or partial) ``start``, and more than once.
        """
        ...
