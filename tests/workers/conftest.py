"""Fixtures of the workers tests: fault injection through the executors' ``worker_cls``.

``broken_device_worker(marker_dir, *shards)`` returns a ``LensWorker`` subclass whose device work
raises a sticky CUDA error (an illegal memory access, as a faulty kernel gives) the first time it
meets each of ``shards``, across processes (``marker_dir`` remembers); it works for the local
executor (``LocalExecutor(spec, worker_cls=...)``) and for Ray.

``shard_killing_worker(*shards)`` returns a ``LensWorker`` subclass whose process kills itself
with ``SIGKILL`` (exactly as the kernel's OOM killer would) when it is given one of ``shards``;
pass it as ``RayExecutor(spec, worker_cls=...)`` and the job through ``run_job(spec,
executor=...)``. The production code has no test-only path: the fault lives here.

Ray builds the worker inside its actor processes, which cannot import this file (pytest loads it
with ``--import-mode=importlib``, from outside any installed package), so this module is
registered with Ray's cloudpickle to be pickled *by value*: the class travels with the actor's
constructor arguments, and only its base, ``LensWorker``, is imported there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from codelens.engine.data.windows import Shard
from codelens.workers.worker import ComputedShard, LensWorker, ShardResult

log = logging.getLogger(__name__)


class ShardKillingWorker(LensWorker):
    """A ``LensWorker`` whose process dies (``SIGKILL``) on the shards in ``kill_shards``."""

    kill_shards: ClassVar[frozenset[int]] = frozenset()

    def run_shard(self, task: Shard) -> ShardResult:
        if task.index in self.kill_shards:
            log.warning("shard %d is in kill_shards: killing pid %d", task.index, os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run_shard(task)


@pytest.fixture(scope="session")
def shard_killing_worker() -> Callable[..., type[LensWorker]]:
    """Factory: ``shard_killing_worker(*shards)`` -> a worker class killed by those shards."""
    ray = pytest.importorskip("ray")
    # Every class made here (and its base above) is defined in this module: pickle it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def make(*shards: int) -> type[LensWorker]:
        return type("ShardKillingWorker", (ShardKillingWorker,), {"kill_shards": frozenset(shards)})

    return make


class BrokenDeviceWorker(LensWorker):
    """A ``LensWorker`` whose GPU "fails" once on each shard in ``broken_shards``."""

    broken_shards: ClassVar[frozenset[int]] = frozenset()
    marker_dir: ClassVar[str] = ""

    def compute(self, task: Shard) -> ComputedShard:
        marker = Path(self.marker_dir) / f"broke-{task.index}"
        if task.index in self.broken_shards and not marker.exists():
            marker.touch()
            raise RuntimeError(
                "CUDA error: an illegal memory access was encountered\n"
                "CUDA kernel errors might be asynchronously reported at some other API call"
            )
        return super().compute(task)


@pytest.fixture(scope="session")
def broken_device_worker() -> Callable[..., type[LensWorker]]:
    """Factory: ``broken_device_worker(marker_dir, *shards)`` -> a worker class whose device
    fails once on each of those shards."""
    try:
        import ray
    except ImportError:
        pass
    else:
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def make(marker_dir: Path, *shards: int) -> type[LensWorker]:
        attrs = {"broken_shards": frozenset(shards), "marker_dir": str(marker_dir)}
        return type("BrokenDeviceWorker", (BrokenDeviceWorker,), attrs)

    return make
