"""The embedded default executor: shards run in this process, no Ray, its stages overlapped."""

from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from codelens.engine.data.windows import Shard
from codelens.engine.errors import CodelensError
from codelens.engine.schemas import JobSpec
from codelens.workers.pipelining import PLAN_AHEAD, prefetch
from codelens.workers.progress import ProgressTracker
from codelens.workers.worker import (
    ComputedShard,
    DeviceFailedError,
    LensWorker,
    ShardResult,
    is_sticky_device_error,
)

log = logging.getLogger(__name__)

HOST_QUEUE = 2
"""Computed shards waiting for (or in) the host stage: the memory bound of the overlap."""


def _record_failure(tracker: ProgressTracker, shard: Shard, error: BaseException) -> None:
    tracker.shard_failed(shard.index, f"{type(error).__name__}: {error}", final=True)


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
        """Compute and commit each shard in order, three stages side by side.

        A planner thread plans up to ``PLAN_AHEAD`` shards ahead (tokenizer, lexer, windows);
        this thread runs each shard's device work (``LensWorker.compute``); a host thread turns
        the previous shard into rows and partials and commits it (``LensWorker.finish``, then
        ``commit``), with at most ``HOST_QUEUE`` shards waiting for it. Commits happen in shard
        order, one at a time, with the same protocol as before; an interrupt lets the commit in
        progress finish and drops the shards not yet committed (a rerun computes them).
        """
        tracker.workers_alive = 1
        waiting: deque[tuple[Shard, Future]] = deque()
        host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codelens-host")

        stopped = threading.Event()  # a commit failed: the shards queued behind it are dropped

        def finish_and_commit(computed: ComputedShard) -> ShardResult | BaseException | None:
            if stopped.is_set():
                return None
            try:
                result = self.worker.finish(computed)
            except (CodelensError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - a shard failure, reported by the caller
                log.error("shard %d failed:\n%s", computed.task.index, traceback.format_exc())
                return e
            try:
                commit(result)
            except BaseException:
                stopped.set()  # a failed commit (disk full, ...) stops the job: raised, not caught
                raise
            return result

        def settle(limit: int) -> None:
            """Wait for the oldest host jobs until at most ``limit`` are waiting."""
            while len(waiting) > limit:
                shard, future = waiting.popleft()
                outcome = future.result()
                if isinstance(outcome, BaseException):
                    _record_failure(tracker, shard, outcome)
                elif outcome is not None:
                    tracker.shard_done(outcome.n_tokens)

        try:
            with prefetch(shards, PLAN_AHEAD) as planned:
                for shard in planned:
                    try:
                        computed = self.worker.compute(shard)
                    except (CodelensError, KeyboardInterrupt, MemoryError):
                        raise
                    except Exception as e:  # noqa: BLE001 - recorded; the job exits non-zero
                        log.error("shard %d failed:\n%s", shard.index, traceback.format_exc())
                        _record_failure(tracker, shard, e)
                        if is_sticky_device_error(e):
                            settle(0)  # the shards computed before it are fine: commit them
                            raise DeviceFailedError(
                                f"shard {shard.index}: {type(e).__name__}: {e}. The GPU cannot be "
                                "used by this process after that error, so the job stopped; the "
                                "committed shards are kept. Run the same command again (a new "
                                "process gets a fresh GPU context); if the same shard fails "
                                "again, its input or a kernel is at fault: report it."
                            ) from None
                        continue
                    settle(HOST_QUEUE - 1)
                    waiting.append((shard, host.submit(finish_and_commit, computed)))
                settle(0)
        finally:
            host.shutdown(wait=True, cancel_futures=True)

    def shutdown(self) -> None:
        """Release the model."""
        self.worker.shutdown()
