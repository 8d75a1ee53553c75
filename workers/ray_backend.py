"""The Ray executor: one ``LensWorker`` per Ray actor, scheduled shard by shard by the driver.

This is the only module that imports ``ray``. The driver (the process running ``codelens run``)
plans shards lazily, hands them to actors, and commits every result through the run directory's
protocol; actors compute and write their own part files. Three rules shape the code:

* **Workers write rows, the driver decides what is committed.** Each actor writes a shard's part
  file into the run directory's staging folder, under a name the driver chose for that attempt
  (``RunDir.staging_path``), and returns only the shard's partial aggregates. The driver commits
  it with a rename into ``lens/`` and a manifest line (``RunDir.commit_part``), so it never
  touches a part's bytes and is not the bottleneck of a cluster; the manifest and
  ``_status.json`` are written by the driver only. Exactly-once output follows from the commit
  protocol: a shard is committed at most once per run (a second result for an already committed
  index is dropped and its staged file removed), and a shard recomputed by a later run replaces
  its own part file. So ``output.dir`` must be one directory that the driver and every worker
  see at the same path (a shared file system); ``start`` checks that before any work.
* **Scheduling is dynamic with backpressure.** Each actor holds at most
  ``IN_FLIGHT_PER_WORKER`` shards (one running, one queued so that the next shard is already
  there when the current one ends); a free slot pulls the next shard from the lazily consumed
  plan, so faster workers take more shards and the driver never holds more than a few results.
* **Failures are classified by what they say about the shard.** An exception raised by the
  runner (a poisoned input) is retried up to ``MAX_ATTEMPTS`` times in all and then reported as
  the shard's failure; a ``CodelensError`` (a problem with the job itself) stops the job, as in
  the local executor. A dead worker process (``RayActorError``: OOM killer, segfault, lost node)
  puts its shards back in the queue; Ray restarts the actor (``max_restarts=-1``) and the driver
  makes the new process reload the model before giving it work again. A worker that died holding
  one shard charges it one attempt, so a shard that kills every worker it touches ends as a named
  failure instead of an endless restart loop. An actor overlaps two shards (one on the device,
  the one before it on the host), so a death with two in flight cannot say which one caused it:
  neither is charged, and each is rerun *alone* on an actor, where a death is charged precisely.

Actors run their calls in threads (``max_concurrency``: the shards in flight): a shard's device
work holds the actor's device lock, its rows, partials and part file are made outside it, so the
next shard's forward runs meanwhile, as in the local executor.

Actors: on a cluster with GPUs, one actor per ``execution.gpus_per_worker`` GPUs of one node
(``num_gpus=N``; N = 1: one actor per GPU), the model split over its N GPUs; without GPUs (or with
``model.device: cpu``), ``execution.workers`` CPU actors, each reserving
``min(1, available CPUs / workers)`` CPUs (fractions let a 2-core machine run 2 actors) and
running ``max(1, floor(available CPUs / workers))`` torch threads so that the actors together do
not oversubscribe the cores.

Cluster: ``execution.ray_address`` joins an existing cluster; without it a local Ray instance is
started for the job (dashboard off, usage stats off unless ``RAY_USAGE_STATS_ENABLED`` says
otherwise) and stopped with it. If Ray is already initialised in this process (a notebook, the
test suite), the executor attaches to that instance and leaves it running.

Actor logs (each remote method logs failures with the worker's slot, pid, node and GPU before
re-raising) go to Ray's session log directory (``/tmp/ray/session_latest/logs/worker-*.err`` on
each node); the driver logs every failure it handles with the same context.

The actors build ``RayExecutor``'s ``worker_cls`` (``LensWorker`` unless told otherwise), so a test
can inject faults from its own ``LensWorker`` subclass; this module has no test-only code path.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codelens.engine.data.windows import Shard
from codelens.engine.errors import CodelensError
from codelens.engine.model.loading import is_hub_repo_id
from codelens.engine.run.rundir import RunDir
from codelens.engine.schemas import JobSpec
from codelens.workers.pipelining import PLAN_AHEAD, prefetch
from codelens.workers.progress import ProgressTracker
from codelens.workers.worker import LensWorker, ShardResult, is_sticky_device_error

try:
    import ray
    from ray import exceptions as ray_errors
except ImportError:  # the executor raises a CodelensError naming the extra to install
    ray = None
    ray_errors = None

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Failed attempts after which a shard is reported as failed (and left for a later rerun)."""

IN_FLIGHT_PER_WORKER = 2
"""Shards submitted to one actor at a time: the running one plus one queued behind it."""

MAX_REVIVE_FAILURES = 3
"""Consecutive failed model reloads after which a restarted actor is given up."""

PLACEMENT_TIMEOUT_S = 300.0
"""How long the actors may take to be placed and start (worker start-up and imports included)."""

NO_WORKER_TIMEOUT_S = 600.0
"""How long work may wait with no worker alive (all restarting) before the job gives up."""

RESOURCE_WAIT_S = 10.0
"""How long the start waits for CPUs that a previous job's actors are still giving back."""

MIN_CPUS_PER_ACTOR = 0.01
"""The smallest CPU request of a CPU actor (when the free CPUs are shared by many workers)."""

MAX_REVIVE_DELAY_S = 2.0
"""Longest pause between reload requests to a restarting actor."""

WAIT_S = 1.0
"""``ray.wait`` timeout: how often the driver loop wakes up when nothing completes."""

_CONSISTENT_KEYS = (
    "family",
    "model_class",
    "dtype",
    "impl",
    "n_blocks",
    "layers",
    "vocab_rows",
    "tokenizer_vocab",
    "d_model",
    "token_sets",
)
"""What every worker must resolve identically, or rows from different workers would differ."""


RAY_SUPPORTED = ">=2.40"
"""Ray releases the backend is tested with (pyproject.toml's ``ray`` extra)."""


def _require_ray() -> None:
    """Raise CodelensError when Ray is missing or outside ``RAY_SUPPORTED``."""
    if ray is None:
        raise CodelensError(
            "execution.backend 'ray' needs Ray, which is not installed: run "
            "pip install 'code-llm-lens[ray]' (or set execution.backend: local)"
        )
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if not SpecifierSet(RAY_SUPPORTED).contains(Version(ray.__version__), prereleases=True):
        raise CodelensError(
            f"ray {ray.__version__} is installed, but execution.backend 'ray' needs "
            f"ray{RAY_SUPPORTED}: pip install 'ray{RAY_SUPPORTED}' "
            "(or set execution.backend: local)"
        )


def _short(err: BaseException) -> str:
    """First line of an error, for logs and status (Ray's messages run to many lines)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- inside the actor ----------------------------------------------------------------------------


class _LensActor:
    """A ``LensWorker`` living in a Ray worker process (wrapped with ``ray.remote`` by the driver).

    The worker is built here, in the actor's process, so that CUDA is first touched after Ray has
    set ``CUDA_VISIBLE_DEVICES`` for this actor. When Ray restarts the actor after its process
    died, ``__init__`` runs again with an empty worker: the driver then calls ``load`` before
    sending shards, and ``run_shard`` also loads on its own if it arrives first. There is no
    shutdown method: the driver kills the actor, and the process's exit frees the model and the GPU.

    Args:
        spec_json: the job spec as JSON (small, so Ray can keep it for restarts).
        slot: this actor's number among the job's actors (for logs).
        torch_threads: intra-op threads for torch, or None to leave torch's default.
        worker_cls: the worker to build (``LensWorker``, or a subclass); Ray pickles the class,
            so it must be importable in the actor's process or pickled by value.
    """

    def __init__(
        self,
        spec_json: str,
        slot: int,
        torch_threads: int | None,
        worker_cls: type[LensWorker] = LensWorker,
    ) -> None:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file loading bars would flood the worker logs
        self.slot = slot
        self.worker = worker_cls(JobSpec.model_validate_json(spec_json))
        self.resolved: dict[str, Any] | None = None
        # The actor runs its calls in threads (``max_concurrency``): one shard's device work at a
        # time, under this lock, while the shard before it is finished and written on the host.
        self.device = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """Where this actor runs: slot, pid, node, GPUs, torch threads, whether it was restarted."""
        import torch

        context = ray.get_runtime_context()
        return {
            "slot": self.slot,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
            "torch_threads": torch.get_num_threads(),
            "restarted": bool(context.was_current_actor_reconstructed),
        }

    def _where(self) -> str:
        d = self.describe()
        gpus = f", GPU {','.join(d['gpu_ids'])}" if d["gpu_ids"] else ""
        return f"worker {self.slot} (pid {d['pid']} on {d['hostname']}{gpus})"

    def load(self) -> dict[str, Any]:
        """Load the model once (self-check included); returns the resolved dict + ``describe()``."""
        with self.device:
            if self.resolved is None:
                try:
                    self.resolved = self.worker.load()
                except Exception:
                    log.exception(
                        "%s: loading %s failed", self._where(), self.worker.spec.model.path
                    )
                    raise
        return {**self.resolved, "worker": self.describe()}

    def check_run_dir(self, probe: str, answer: str) -> str:
        """``LensWorker.check_run_dir`` (paths as strings: they name the driver's files)."""
        return self.worker.check_run_dir(Path(probe), Path(answer))

    def run_shard(self, shard: Shard, attempt: int, part: str) -> ShardResult:
        """Compute one shard and write its part file to ``part`` (a path the driver chose).

        ``attempt`` counts from 1; it is only reported. Returns the result without its rows.
        """
        try:
            if self.resolved is None:
                self.load()
            with self.device:
                computed = self.worker.compute(shard)
            # Outside the lock: the actor's next call starts its device work meanwhile.
            return self.worker.stage(self.worker.finish(computed), Path(part))
        except Exception as e:
            log.exception("%s: shard %d (attempt %d) failed", self._where(), shard.index, attempt)
            if is_sticky_device_error(e):
                # The CUDA context is unusable for the rest of this process: end it, so Ray
                # restarts the actor (a fresh context, the model reloaded) before it takes more
                # work; the driver requeues the shard, charging this attempt to it.
                log.error("%s: the GPU is unusable after this error: exiting", self._where())
                os.kill(os.getpid(), signal.SIGKILL)
            raise


# -- the driver ----------------------------------------------------------------------------------


@dataclass
class _Slot:
    """The driver's view of one actor."""

    index: int
    actor: Any
    info: dict[str, Any]
    state: str = "alive"
    """'alive' (gets shards), 'reviving' (restarted, reloading the model) or 'dead' (given up)."""
    inflight: list[_Task] = field(default_factory=list)
    """Tasks submitted to this actor, oldest first: the first one is the one running."""
    revive_failures: int = 0
    """Failed reloads since the actor was last alive (a restart still in progress is not one)."""
    revive_delay: float = 0.0
    """Back-off before the next reload request, doubled after each failure."""
    down_since: float = 0.0
    """``time.monotonic()`` when the driver found the worker dead."""

    def where(self) -> str:
        info = self.info
        gpus = f", GPU {','.join(info['gpu_ids'])}" if info.get("gpu_ids") else ""
        return f"worker {self.index} (pid {info.get('pid')} on {info.get('hostname')}{gpus})"


@dataclass
class _Task:
    shard: Shard
    slot: _Slot
    attempt: int
    """1 for the first try of this shard in this run."""
    part: Path
    """Where the actor writes the part file (unique to this submission)."""
    alone: bool
    """Run with no other shard on its actor (after a death that could not be attributed)."""


def _node_gpus(node: dict[str, Any]) -> int:
    """GPUs of one entry of ``ray.nodes()`` (0 for a node that is not alive)."""
    return int(node.get("Resources", {}).get("GPU", 0)) if node.get("Alive", True) else 0


def gpu_actor_count(node_gpus: Iterable[int], gpus_per_worker: int) -> int:
    """How many actors of ``gpus_per_worker`` GPUs fit: ``sum over nodes of gpus // N``.

    An actor's GPUs must be on one node (one process holds the model), so a node's leftover
    GPUs (8 GPUs, N = 3: 2 actors, 2 GPUs idle) do not combine with another node's.

    Raises:
        CodelensError: not one actor fits (how many GPUs there are, and the fix).
    """
    node_gpus = [g for g in node_gpus if g > 0]
    count = sum(g // gpus_per_worker for g in node_gpus)
    if count:
        return count
    total, largest = sum(node_gpus), max(node_gpus, default=0)
    if total < gpus_per_worker:
        problem = f"the Ray cluster has {total} GPU(s) in all"
    else:
        problem = f"no node has that many (the largest has {largest}; a worker uses one node's)"
    raise CodelensError(
        f"execution.gpus_per_worker is {gpus_per_worker}, but {problem}: lower "
        f"execution.gpus_per_worker to {max(1, largest)} or fewer, or add a node with "
        f"{gpus_per_worker} GPUs"
    )


class RayExecutor:
    """Runs a job's shards on Ray actors, each holding one ``LensWorker`` (an ``Executor``).

    Args:
        spec: the validated job.
        max_attempts: failed attempts after which a shard is reported as failed.
        in_flight_per_worker: shards submitted to one actor at a time.
        worker_cls: the worker each actor builds (``LensWorker``, or a subclass such as a test's
            fault-injecting one); Ray pickles it into the actor processes.

    Raises:
        CodelensError: Ray is not installed.
    """

    def __init__(
        self,
        spec: JobSpec,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        in_flight_per_worker: int = IN_FLIGHT_PER_WORKER,
        worker_cls: type[LensWorker] = LensWorker,
    ) -> None:
        _require_ray()
        self.spec = spec
        self.max_attempts = max_attempts
        self.in_flight_per_worker = in_flight_per_worker
        self.worker_cls = worker_cls
        # Actors may run in another working directory, or on another node where the model lies
        # at the same absolute path: resolve a relative model path here, as the local backend
        # would resolve it against the driver's current directory. A hub repo id stays one: each
        # actor finds it (at model.revision) in its own node's hub cache.
        path = spec.model.path
        if not is_hub_repo_id(path):
            path = path.expanduser().resolve()
        model = spec.model.model_copy(update={"path": path})
        self._spec_json = spec.model_copy(update={"model": model}).model_dump_json()
        # The driver names every part file an actor writes: absolute, as the actors see it.
        self.run_dir = RunDir(spec.output.dir.expanduser().resolve())
        self.run_token = uuid.uuid4().hex[:12]
        """Unique to this driver's run: its staged part names never meet another driver's."""
        self._owns_ray = False
        self._slots: list[_Slot] = []
        self._reference: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Connect to (or start) Ray, start the actors and load the model in each.

        Returns:
            What the first worker resolved (family, device, dtype, impl, ...), plus ``workers``
            (where each actor runs) and ``ray`` (cluster address, version, actor resources).

        Raises:
            CodelensError: Ray cannot be reached, the actors cannot be placed in time, a worker
                cannot load the model, or the workers resolve the job differently.
        """
        self._connect()
        n_workers, options, torch_threads = self._plan_actors()
        remote_cls = ray.remote(_LensActor)
        # max_restarts=-1: Ray restarts a dead actor process whenever it dies (the driver bounds
        # the damage: attempts per shard, reloads per actor). max_task_retries=0: Ray never
        # re-runs a task on its own; the driver resubmits, so it always knows where a shard is.
        actors = [
            remote_cls.options(
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=self.in_flight_per_worker,
                **options,
            ).remote(self._spec_json, i, torch_threads, self.worker_cls)
            for i in range(n_workers)
        ]
        self._slots = [_Slot(i, actor, {}) for i, actor in enumerate(actors)]
        try:
            infos = ray.get([a.describe.remote() for a in actors], timeout=PLACEMENT_TIMEOUT_S)
        except ray_errors.GetTimeoutError:
            raise CodelensError(
                f"Ray could not start {n_workers} worker(s) needing {self._resources(options)} "
                f"each within {PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {self._available()} "
                "available. Lower execution.workers or add nodes (`ray status` shows the cluster)."
            ) from None
        except ray_errors.RayError as e:
            raise CodelensError(
                f"a Ray worker failed to start ({_short(e)}); is code-llm-lens installed in the "
                "same environment on every node? (worker logs: "
                "/tmp/ray/session_latest/logs/worker-*.err on the node)"
            ) from None
        for slot, info in zip(self._slots, infos, strict=True):
            slot.info = info
        self._check_run_dir()
        # All actors load at once (one model per GPU in parallel), then each answer is checked.
        loads = [slot.actor.load.remote() for slot in self._slots]
        resolved = [self._get_load(slot, ref) for slot, ref in zip(self._slots, loads, strict=True)]
        self._reference = resolved[0]
        for slot, r in zip(self._slots[1:], resolved[1:], strict=True):
            problem = self._inconsistency(r)
            if problem:
                raise CodelensError(
                    f"{slot.where()} resolved the job differently from worker 0 ({problem}); rows "
                    "from different workers would not be comparable. Pin model.dtype and lens.impl "
                    "in the spec, or use nodes of one kind."
                )
        first = {k: v for k, v in resolved[0].items() if k != "worker"}
        return {
            **first,
            "backend": "ray",
            "ray": {
                "address": ray.get_runtime_context().gcs_address,
                "version": ray.__version__,
                "started_local_cluster": self._owns_ray and not self.spec.execution.ray_address,
                "actor_resources": self._resources(options),
                "torch_threads": torch_threads,
            },
            "workers": [slot.info for slot in self._slots],
        }

    def run(
        self,
        shards: Iterable[Shard],
        commit: Callable[[ShardResult], None],
        tracker: ProgressTracker,
    ) -> None:
        """Compute the shards on the actors and commit each result once, as it arrives.

        Args:
            shards: the shards to compute; consumed lazily, only when an actor has room.
            commit: writes one result (the run directory's protocol); called by this process only.
            tracker: progress, retries, failures and workers alive.

        Raises:
            CodelensError: a shard raised one (a problem with the job, not with its data), or no
                worker has been alive for ``NO_WORKER_TIMEOUT_S``, or every worker was given up.
        """
        # The planner (tokenizer, lexer) runs a few shards ahead in a thread, so the driver loop
        # that feeds the actors never waits for it.
        with prefetch(shards, PLAN_AHEAD) as planned:
            _Scheduler(self, planned, commit, tracker).run()

    def shutdown(self) -> None:
        """Stop the actors, and the Ray instance if this executor started it. Safe to call twice."""
        if ray is None:
            return
        for slot in self._slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception as e:  # noqa: BLE001 - shutting down: a dead actor is fine
                log.debug("killing %s: %s", slot.where(), e)
        self._slots = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    # -- helpers --------------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        """Raise CodelensError unless every actor sees and can write the driver's run directory.

        The driver writes a probe file there; each actor reads it and writes its answer beside it,
        which the driver reads back. A run directory on a node's local disk fails this on any
        worker of another node, before a model is loaded.
        """
        staging = self.run_dir.staging_dir
        staging.mkdir(parents=True, exist_ok=True)
        probe = staging / f"probe-{self.run_token}"
        probe.write_text(self.run_token)
        answers = [staging / f"probe-{self.run_token}.{slot.index}" for slot in self._slots]
        try:
            replies = ray.get(
                [
                    slot.actor.check_run_dir.remote(str(probe), str(answer))
                    for slot, answer in zip(self._slots, answers, strict=True)
                ],
                timeout=PLACEMENT_TIMEOUT_S,
            )
            for slot, reply, answer in zip(self._slots, replies, answers, strict=True):
                if reply != self.run_token:
                    problem = f"it cannot read {probe} ({reply})"
                elif not answer.exists() or answer.read_text() != self.run_token:
                    problem = f"the file it wrote at {answer} did not reach the driver"
                else:
                    continue
                raise CodelensError(
                    f"{slot.where()} cannot use the run directory {self.run_dir.path}: {problem}. "
                    "Ray workers write their part files into output.dir themselves, so it must be "
                    "one directory that the driver's node and every worker's node mount at the "
                    "same path (NFS, Lustre, a cluster file system); or run with "
                    "execution.backend: local"
                )
        finally:
            for path in (probe, *answers):
                path.unlink(missing_ok=True)

    def _connect(self) -> None:
        address = self.spec.execution.ray_address
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if address and address not in ("auto", current):
                log.warning(
                    "Ray is already connected to %s in this process; using it, not %s",
                    current,
                    address,
                )
            self._owns_ray = False
            return
        # Users may opt in with RAY_USAGE_STATS_ENABLED=1; a batch job should not phone home.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Actor logs stay in Ray's log files: the driver reports every failure it handles, and
        # forwarded worker output would break up the progress bar.
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(include_dashboard=False, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            hint = (
                "start it with `ray start --head` on the head node, or fix execution.ray_address"
                if address
                else "check `ray status`, or set execution.ray_address to an existing cluster"
            )
            raise CodelensError(f"cannot connect to {where}: {e}; {hint}") from None
        self._owns_ray = True

    def _plan_actors(self) -> tuple[int, dict[str, Any], int | None]:
        """How many actors, with which resources, and how many torch threads each."""
        gpus = int(ray.cluster_resources().get("GPU", 0))
        wanted = self.spec.execution.workers
        per_worker = self.spec.execution.gpus_per_worker
        if gpus and self.spec.model.device != "cpu":
            # One actor per `gpus_per_worker` GPUs of a node: `workers` caps it only when the spec
            # sets it (its default is 1, which on a GPU cluster would leave GPUs idle).
            fit = gpu_actor_count([_node_gpus(node) for node in ray.nodes()], per_worker)
            explicit = "workers" in self.spec.execution.model_fields_set
            n = min(wanted, fit) if explicit else fit
            if explicit and wanted > fit:
                log.warning(
                    "execution.workers=%d but the cluster has room for %d worker(s) of %d GPU(s): "
                    "starting %d",
                    wanted,
                    fit,
                    per_worker,
                    n,
                )
            return n, {"num_gpus": per_worker, "num_cpus": 1}, None
        if per_worker > 1:
            raise CodelensError(
                f"execution.gpus_per_worker is {per_worker}, but the Ray cluster has no GPUs "
                f"({self._available()} available): add GPU nodes, or set "
                "execution.gpus_per_worker: 1"
            )
        cpus = self._free_cpus(wanted)
        share = cpus / wanted
        if share < 1:
            log.warning("%d workers share %.2f free CPU(s): each gets a fraction", wanted, cpus)
        # Ray accepts resource amounts in steps of 1e-4: round down so that all actors fit, but
        # ask for a sliver at least, so that a full cluster makes the actors wait (and the start
        # time out with a message) rather than run on CPUs that other jobs hold.
        num_cpus = max(MIN_CPUS_PER_ACTOR, math.floor(min(1.0, share) * 1e4) / 1e4)
        # SPREAD: CPU actors on different nodes, so that each one's torch threads have the cores.
        options = {"num_cpus": num_cpus, "num_gpus": 0, "scheduling_strategy": "SPREAD"}
        return wanted, options, max(1, int(share))

    @staticmethod
    def _free_cpus(wanted: int) -> float:
        """Free CPUs in the cluster, after a short wait for CPUs still being released.

        Actors of a job that just ended (or a driver that was just killed) give their CPUs back
        asynchronously; without the wait, a job started right after would see none free.
        """
        target = min(float(ray.cluster_resources().get("CPU", 0.0)), float(wanted))
        deadline = time.monotonic() + RESOURCE_WAIT_S
        while True:
            free = float(ray.available_resources().get("CPU", 0.0))
            if free >= target or time.monotonic() > deadline:
                return free
            time.sleep(0.2)

    def _get_load(self, slot: _Slot, ref: Any) -> dict[str, Any]:
        """The answer of ``slot``'s first ``load``, or a CodelensError saying why there is none."""
        try:
            resolved = ray.get(ref)
        except ray_errors.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, CodelensError):
                raise cause from None
            raise CodelensError(
                f"{slot.where()} could not load the model: {type(cause).__name__}: {cause}"
            ) from None
        except ray_errors.RayError as e:
            raise CodelensError(
                f"{slot.where()} died while loading the model ({_short(e)}); run again"
            ) from None
        slot.info = resolved["worker"]
        return resolved

    def _inconsistency(self, resolved: dict[str, Any]) -> str:
        for key in _CONSISTENT_KEYS:
            if resolved.get(key) != self._reference.get(key):
                return f"{key}={resolved.get(key)!r}, worker 0 has {self._reference.get(key)!r}"
        # Snapshot paths may differ between nodes' caches; the commit must not (a branch such as
        # main can point at different commits in two caches).
        mine, ref = (
            (r.get("model_source") or {}).get("commit") for r in (resolved, self._reference)
        )
        if mine != ref:
            return (
                f"model commit={mine!r}, worker 0 has {ref!r}: set model.revision to one commit "
                "and cache it on every node"
            )
        mine, ref = str(resolved.get("device", "")), str(self._reference.get("device", ""))
        if mine.split(":")[0] != ref.split(":")[0]:  # cuda:0 on every node is the same device kind
            return f"device={mine!r}, worker 0 has {ref!r}"
        return ""

    @staticmethod
    def _resources(options: dict[str, Any]) -> str:
        return f"{options.get('num_cpus', 0)} CPU / {options.get('num_gpus', 0)} GPU"

    @staticmethod
    def _available() -> str:
        avail = ray.available_resources()
        return f"{avail.get('CPU', 0):g} CPU / {avail.get('GPU', 0):g} GPU"


class _Scheduler:
    """One ``RayExecutor.run``: dynamic assignment, commits, retries and worker revival.

    State lives on the driver only, so the loop can be read as a sequence of events: a shard
    result arrives (commit it), a shard raised (retry or give up), a worker died (requeue its
    shards, revive it), a revived worker finished reloading (give it work again).
    """

    def __init__(
        self,
        executor: RayExecutor,
        shards: Iterable[Shard],
        commit: Callable[[ShardResult], None],
        tracker: ProgressTracker,
    ) -> None:
        self.executor = executor
        self.slots = executor._slots
        self.source: Iterator[Shard] = iter(shards)
        self.exhausted = False
        self.commit = commit
        self.tracker = tracker
        self.requeued: deque[tuple[Shard, int, bool]] = deque()
        """Shards to run again: (shard, number of the next attempt, to run alone); served first."""
        self.submitted = 0
        """Submissions so far: numbers each staged part file, so that no two share a name."""
        self.failed_attempts: dict[int, int] = {}
        self.tasks: dict[Any, _Task] = {}
        """In-flight ``run_shard`` calls by ObjectRef."""
        self.revivals: dict[Any, _Slot] = {}
        """In-flight ``load`` calls on restarted actors by ObjectRef."""
        self.revive_queue: list[tuple[float, _Slot]] = []
        """Reload requests waiting for their back-off to pass: (due time, slot)."""
        self.committed: set[int] = set()

    def run(self) -> None:
        """Loop until every shard is committed or has failed for good."""
        self._update_alive()
        while True:
            self._send_due_revivals()
            self._fill()
            if not self.tasks:
                if self.exhausted and not self.requeued:
                    return
                self._check_a_worker_can_come_back()
            refs = list(self.tasks) + list(self.revivals)
            if not refs:
                time.sleep(WAIT_S)  # only delayed reloads are pending
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_S)
            for ref in ready:
                if ref in self.revivals:
                    self._on_revival(self.revivals.pop(ref), ref)
                elif ref in self.tasks:  # absent: a task of a worker already handled as dead
                    self._on_task(self.tasks.pop(ref), ref)
            self._update_alive()

    # -- assignment -----------------------------------------------------------------------------

    def _next_shard(self, idle: bool) -> tuple[Shard, int, bool] | None:
        """The next shard for a slot (``idle``: it holds none); None when none is for it now."""
        if self.requeued:
            if self.requeued[0][2] and not idle:
                return None  # a shard to run alone waits for an idle actor
            return self.requeued.popleft()
        if not self.exhausted:
            try:
                return next(self.source), 1, False
            except StopIteration:
                self.exhausted = True
        return None

    def _fill(self) -> None:
        """Give free actor slots work; every alive actor gets a first shard before any a second."""
        for depth in range(1, self.executor.in_flight_per_worker + 1):
            for slot in self.slots:
                if slot.state != "alive" or len(slot.inflight) >= depth:
                    continue
                if slot.inflight and slot.inflight[0].alone:
                    continue
                item = self._next_shard(idle=not slot.inflight)
                if item is None:
                    if self.exhausted and not self.requeued:
                        return
                    continue
                shard, attempt, alone = item
                self.submitted += 1
                tag = f"{self.executor.run_token}-{self.submitted}"
                part = self.executor.run_dir.staging_path(shard.index, tag)
                task = _Task(shard, slot, attempt, part, alone)
                self.tasks[slot.actor.run_shard.remote(shard, attempt, str(part))] = task
                slot.inflight.append(task)

    # -- events ---------------------------------------------------------------------------------

    def _on_task(self, task: _Task, ref: Any) -> None:
        try:
            # The object is ready, so this returns at once (the timeout only guards a Ray bug).
            result = ray.get(ref, timeout=60)
        except ray_errors.RayActorError as e:
            self._on_worker_death(task.slot, e)  # the task is still in slot.inflight, in order
            return
        except ray_errors.RayTaskError as e:
            task.slot.inflight.remove(task)
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, CodelensError):
                raise cause from None  # a problem with the job itself, as in the local executor
            log.error(
                "shard %d failed on %s (attempt %d):\n%s",
                task.shard.index,
                task.slot.where(),
                task.attempt,
                e,
            )
            self._requeue(task, f"{type(cause).__name__}: {cause}", charged=True)
            return
        except ray_errors.RayError as e:
            # Object lost with its node, worker crashed, ...: not the data's fault, but charged
            # all the same so that no shard can loop forever.
            task.slot.inflight.remove(task)
            log.warning(
                "shard %d on %s: %s; requeued", task.shard.index, task.slot.where(), _short(e)
            )
            self._requeue(task, _short(e), charged=True)
            return
        task.slot.inflight.remove(task)
        if result.index in self.committed:
            # Two actors computed this shard (a resubmitted task whose first run finished after
            # all): the first result is committed, and a shard is committed at most once per run.
            log.warning("shard %d: dropping a second result", result.index)
            if result.staged is not None:
                result.staged.unlink(missing_ok=True)
            return
        self.commit(result)
        self.committed.add(result.index)
        self.tracker.shard_done(result.n_tokens)

    def _on_worker_death(self, slot: _Slot, err: BaseException) -> None:
        """Requeue every shard the dead process held; charge it only when it held one shard.

        With two shards in flight the actor was running both (one on the device, one on the host),
        so the death cannot be pinned on either: both are rerun alone, uncharged.
        """
        lost = list(slot.inflight)
        for ref in [r for r, t in self.tasks.items() if t.slot is slot]:
            del self.tasks[ref]  # they fail with the process; their errors need no handling
        slot.inflight.clear()
        log.warning(
            "%s died while holding shard(s) %s (%s); requeued them, restarting the worker",
            slot.where(),
            [t.shard.index for t in lost],
            _short(err),
        )
        # A node preemption (autoscaler drain) is no shard's fault.
        charged = len(lost) == 1 and not getattr(err, "preempted", False)
        for task in lost:
            self._requeue(task, f"worker died: {_short(err)}", charged=charged, alone=True)
        slot.state, slot.down_since, slot.revive_delay = "reviving", time.monotonic(), 0.0
        self._revive(slot)

    def _on_revival(self, slot: _Slot, ref: Any) -> None:
        """A restarted actor answered its reload request (or failed to)."""
        try:
            resolved = ray.get(ref, timeout=60)
            problem = self.executor._inconsistency(resolved)
            if problem:
                raise CodelensError(f"the restarted worker resolved the job differently: {problem}")
        except ray_errors.ActorUnavailableError as e:
            # Still restarting: Ray refuses calls until the new process is up. Ask again after
            # a pause, without counting it as a failure.
            log.info("%s is not back yet (%s)", slot.where(), _short(e))
            self._revive(slot)
            return
        except (ray_errors.RayError, CodelensError) as e:
            slot.revive_failures += 1
            if slot.revive_failures >= MAX_REVIVE_FAILURES:
                log.error(
                    "%s could not reload the model %d times (%s); giving it up",
                    slot.where(),
                    slot.revive_failures,
                    _short(e),
                )
                slot.state = "dead"
                try:
                    ray.kill(slot.actor, no_restart=True)
                except ray_errors.RayError:
                    pass  # already gone
            else:
                log.warning("%s: reloading the model failed (%s); again", slot.where(), _short(e))
                self._revive(slot)
            return
        slot.info = resolved["worker"]
        slot.state, slot.revive_failures = "alive", 0
        log.warning("%s is back: the restarted process reloaded the model", slot.where())

    # -- retries and revival ----------------------------------------------------------------------

    def _requeue(self, task: _Task, error: str, *, charged: bool, alone: bool = False) -> None:
        """Run ``task``'s shard again (``alone``: with no other shard on its actor), or record it
        as failed after ``max_attempts`` charges."""
        # A part this attempt's worker may have written before it failed is never committed.
        task.part.unlink(missing_ok=True)
        index = task.shard.index
        if charged:
            self.failed_attempts[index] = self.failed_attempts.get(index, 0) + 1
            n = self.failed_attempts[index]
            if n >= self.executor.max_attempts:
                log.error("shard %d failed %d times; giving up on it: %s", index, n, error)
                self.tracker.shard_failed(index, f"{error} (after {n} attempts)", final=True)
                return
        self.requeued.append((task.shard, self.failed_attempts.get(index, 0) + 1, alone))
        self.tracker.shard_failed(index, error, final=False)

    def _revive(self, slot: _Slot) -> None:
        """Schedule a reload request to ``slot``'s actor, after a back-off that doubles (to 2 s)."""
        self.revive_queue.append((time.monotonic() + slot.revive_delay, slot))
        slot.revive_delay = min(MAX_REVIVE_DELAY_S, max(0.25, 2 * slot.revive_delay))

    def _send_due_revivals(self) -> None:
        now = time.monotonic()
        due = [slot for t, slot in self.revive_queue if t <= now]
        self.revive_queue = [(t, slot) for t, slot in self.revive_queue if t > now]
        for slot in due:
            # Answered by the restarted process once it is up: `load` reloads the model there.
            self.revivals[slot.actor.load.remote()] = slot

    def _update_alive(self) -> None:
        alive = sum(slot.state == "alive" for slot in self.slots)
        if self.tracker.workers_alive != alive:
            self.tracker.workers_alive = alive
            self.tracker.write()

    def _check_a_worker_can_come_back(self) -> None:
        """Work is waiting and no worker is alive: fail rather than wait forever."""
        if any(slot.state == "alive" for slot in self.slots):
            return
        reviving = [slot for slot in self.slots if slot.state == "reviving"]
        if not reviving:
            raise CodelensError(
                "every Ray worker died and could not be restarted; the committed shards are kept: "
                "run the same command again to resume (worker logs: Ray's session log directory)"
            )
        waited = time.monotonic() - min(slot.down_since for slot in reviving)
        if waited > NO_WORKER_TIMEOUT_S:
            raise CodelensError(
                f"no Ray worker has been alive for {waited:.0f} s (restarts pending: the cluster "
                "may have lost the nodes or GPUs they need; see `ray status`); run the same "
                "command again to resume"
            )
