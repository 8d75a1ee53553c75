"""Fixtures of the workers tests: fault injection through the executors' ``worker_cls``.

``broken_device_worker(marker_dir, *shards)`` returns a ``LensWorker`` subclass whose device work
raises a sticky CUDA error (an illegal memory access, as a faulty kernel gives) the first time it
meets each of ``shards``, across processes (``marker_dir`` remembers); it works for the local
executor (``LocalExecutor(spec, worker_cls=...)``) and for Ray.

``shard_killing_worker(*shards)`` returns a ``LensWorker`` subclass whose process kills itself
with ``SIGKILL`` (exactly as the kernel's OOM killer would) when it is given one of ``shards``;
pass it as ``RayExecutor(spec, worker_cls=...)`` and the job through ``run_job(spec,
executor=...)``. ``dies_after_writing_worker`` dies once per shard right after writing the part
file, and ``node_local_disk_worker`` sees another file system than the driver (a run directory on
a node's local disk). The production code has no test-only path: the faults live here.

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


def _pickle_by_value() -> None:
    """Make Ray pickle this module's worker classes by value (its actors cannot import it)."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _kill_self(why: str) -> None:
    log.warning("%s: killing pid %d", why, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


class ShardKillingWorker(LensWorker):
    """A ``LensWorker`` whose process dies (``SIGKILL``) on the shards in ``kill_shards``."""

    kill_shards: ClassVar[frozenset[int]] = frozenset()

    def compute(self, task: Shard) -> ComputedShard:
        if task.index in self.kill_shards:
            _kill_self(f"shard {task.index} is in kill_shards")
        return super().compute(task)


@pytest.fixture(scope="session")
def shard_killing_worker() -> Callable[..., type[LensWorker]]:
    """Factory: ``shard_killing_worker(*shards)`` -> a worker class killed by those shards."""
    _pickle_by_value()

    def make(*shards: int) -> type[LensWorker]:
        return type("ShardKillingWorker", (ShardKillingWorker,), {"kill_shards": frozenset(shards)})

    return make


class DiesAfterWritingWorker(LensWorker):
    """A ``LensWorker`` whose process dies right after writing the part of each of ``shards``,
    the first time only (``marker_dir`` remembers, across processes): the driver never hears of
    that part, reruns the shard on another worker, and two part files of one shard exist."""

    shards: ClassVar[frozenset[int]] = frozenset()
    marker_dir: ClassVar[str] = ""

    def stage(self, result: ShardResult, path: Path) -> ShardResult:
        staged = super().stage(result, path)
        marker = Path(self.marker_dir) / f"wrote-{result.index}"
        if result.index in self.shards and not marker.exists():
            marker.write_text(str(path))
            _kill_self(f"wrote the part of shard {result.index}")
        return staged


@pytest.fixture(scope="session")
def dies_after_writing_worker() -> Callable[..., type[LensWorker]]:
    """Factory: ``dies_after_writing_worker(marker_dir, *shards)`` -> a worker class that dies
    once on each of those shards, after writing its part file."""
    _pickle_by_value()

    def make(marker_dir: Path, *shards: int) -> type[LensWorker]:
        attrs = {"shards": frozenset(shards), "marker_dir": str(marker_dir)}
        return type("DiesAfterWritingWorker", (DiesAfterWritingWorker,), attrs)

    return make


class NodeLocalDiskWorker(LensWorker):
    """A ``LensWorker`` on a node whose ``output.dir`` is its own local disk, not the driver's:
    every path it is given resolves under ``node_root`` instead (a real mount would look so)."""

    node_root: ClassVar[str] = ""

    def _on_this_node(self, path: Path) -> Path:
        return Path(self.node_root) / path.relative_to(path.anchor)

    def check_run_dir(self, probe: Path, answer: Path) -> str:
        here = self._on_this_node(answer)
        here.parent.mkdir(parents=True, exist_ok=True)
        return super().check_run_dir(self._on_this_node(probe), here)


@pytest.fixture(scope="session")
def node_local_disk_worker() -> Callable[..., type[LensWorker]]:
    """Factory: ``node_local_disk_worker(node_root)`` -> a worker class whose file system is
    rooted at ``node_root``."""
    _pickle_by_value()

    def make(node_root: Path) -> type[LensWorker]:
        return type("NodeLocalDiskWorker", (NodeLocalDiskWorker,), {"node_root": str(node_root)})

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
        _pickle_by_value()
    except pytest.skip.Exception:
        pass  # the local executor needs no pickling

    def make(marker_dir: Path, *shards: int) -> type[LensWorker]:
        attrs = {"broken_shards": frozenset(shards), "marker_dir": str(marker_dir)}
        return type("BrokenDeviceWorker", (BrokenDeviceWorker,), attrs)

    return make
