"""The embedded default executor: shards run one after another in this process, no Ray."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from codelens.engine.data.windows import Shard
from codelens.engine.errors import CodelensError
from codelens.engine.schemas import JobSpec
from codelens.workers.progress import ProgressTracker
from codelens.workers.worker import LensWorker, ShardResult

log = logging.getLogger(__name__)


class LocalExecutor:
    """Runs every shard through one in-process ``LensWorker`` (an ``Executor``).

    A shard that raises is recorded as failed and the job goes on with the next one (a poisoned
    document must not stop a corpus-scale run); errors in the job's own set-up (``CodelensError``)
    and interrupts stop the job at once.

    Args:
        spec: the validated job.
        worker_cls: the worker to build (``LensWorker``, or a subclass such as a test's).
    """

    def __init__(self, spec: JobSpec, *, worker_cls: type[LensWorker] = LensWorker) -> None:
        self.worker = worker_cls(spec)

    def start(self) -> dict[str, Any]:
        """Load the model; returns what the worker resolved (family, device, impl, ...)."""
        return self.worker.load()

    def run(
        self,
        shards: Iterable[Shard],
        commit: Callable[[ShardResult], None],
        tracker: ProgressTracker,
    ) -> None:
        """Compute and commit each shard in order."""
        tracker.workers_alive = 1
        for shard in shards:
            try:
                result = self.worker.run_shard(shard)
            except (CodelensError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - recorded, reported, and the job exits non-zero
                log.error("shard %d failed:\n%s", shard.index, traceback.format_exc())
                tracker.shard_failed(shard.index, f"{type(e).__name__}: {e}", final=True)
                continue
            commit(result)
            tracker.shard_done(result.n_tokens)

    def shutdown(self) -> None:
        """Release the model."""
        self.worker.shutdown()
