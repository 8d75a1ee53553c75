"""The worker lifecycle shared by every executor: load once, run shards, shut down.

A plain class (vLLM's ``WorkerBase`` shape): the local executor calls it in-process, the Ray backend
wraps it in an actor. It owns the model for its whole life, so the model is loaded (and
self-checked) once per worker, not per shard.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from codelens.engine.data.windows import Shard
from codelens.engine.errors import CodelensError
from codelens.engine.model.loading import LoadedModel, load_model
from codelens.engine.model.placement import gpu_budgets
from codelens.engine.run.rundir import manifest_line, write_part
from codelens.engine.run.runner import ShardRunner, ShardStats
from codelens.engine.schemas import JobSpec

STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "uncorrectable ecc error",
)
"""Messages of CUDA errors that leave the process's CUDA context unusable: every later call fails,
so the only recovery is a new process."""


def is_sticky_device_error(error: BaseException) -> bool:
    """Whether ``error`` is a CUDA error after which this process cannot use the GPU again."""
    if not isinstance(error, RuntimeError) or isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    text = str(error).lower()
    return "cuda" in text and any(marker in text for marker in STICKY_CUDA_ERRORS)


class DeviceFailedError(CodelensError):
    """The worker's GPU is unusable after a sticky CUDA error; the job stopped cleanly."""


@dataclass
class ShardResult:
    """What a worker returns for one shard: its rows (or where it wrote them) and partials."""

    index: int
    table: pa.Table | None
    """The rows; None once the worker wrote them to ``staged`` itself."""
    partials: dict[str, dict[str, Any]] | None
    """The partial aggregates; None once they are encoded into ``manifest_line``."""
    n_tokens: int
    seconds: float
    rows: int
    batch_tokens: int | None = None
    """The worker's cap on padded tokens per forward pass when the shard's device work ended:
    ``execution.batch_tokens``, or less once a batch ran out of device memory and was split (this
    shard's later batches, and every later shard's, are planned under it)."""
    staged: Path | None = None
    """The part file the worker wrote (``RunDir.staging_path``), for the driver to commit."""
    manifest_line: bytes | None = None
    """The shard's manifest line (``rundir.manifest_line``), encoded with ``staged``."""

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records of this shard besides its part file."""
        return {
            "n_tokens": self.n_tokens,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "batch_tokens": self.batch_tokens,
            "partials": self.partials,
        }


@dataclass
class ComputedShard:
    """A shard after its device work: its statistics on the host, rows not yet built."""

    task: Shard
    stats: ShardStats
    seconds: float
    batch_tokens: int
    """``ShardRunner.batch_tokens`` when the shard's device work ended (``ShardResult``'s)."""


class LensWorker:
    """Loads the job's model once and computes shards.

    Args:
        spec: the validated job.
    """

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.loaded: LoadedModel | None = None
        self.runner: ShardRunner | None = None

    def load(self) -> dict[str, Any]:
        """Load the model (with the last-layer self-check) and prepare the runner.

        With ``execution.gpus_per_worker: N > 1`` the model is split over this process's first N
        visible GPUs (under Ray: the N the actor reserved).

        Returns:
            What was resolved: family, device (the lens head's), dtype, lens implementation,
            self-check error, ``model_source`` (the model directory; for a repo id also its
            revision and commit), and with a split the placement (blocks and GiB per GPU).
        """
        m, ex = self.spec.model, self.spec.execution
        devices = None
        if ex.gpus_per_worker > 1:
            devices = gpu_budgets(ex.gpus_per_worker, ex.weights_memory_fraction)
        self.loaded = load_model(
            m.path,
            revision=m.revision,
            dtype=m.dtype,
            device=m.device,
            allow_pickle=m.allow_pickle,
            trust_remote_code=m.trust_remote_code,
            devices=devices,
        )
        parts, placement = self.loaded.parts, self.loaded.placement
        self.runner = ShardRunner(
            self.spec.lens, self.loaded, batch_tokens=self.spec.execution.batch_tokens
        )
        lens = self.runner.lens
        return {
            "family": self.loaded.family,
            "head_source": parts.head_source,
            "model_class": type(self.loaded.model).__name__,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "impl": lens.impl.value,
            "n_blocks": lens.n_blocks,
            "layers": list(lens.layers),
            "vocab_rows": parts.head.vocab_size,
            "tokenizer_vocab": len(self.loaded.tokenizer),
            "d_model": parts.head.d_model,
            "token_sets": lens.token_set_ids,
            "token_set_overlaps": lens.token_set_overlaps,
            "self_check_max_abs_err": self.loaded.self_check_max_abs_err,
            "impl_check_max_abs_err": self.runner.impl_check_max_abs_err,
            "model_source": self.loaded.source.record() if self.loaded.source else None,
            "placement": None if placement is None else placement.describe(),
        }

    def _runner(self) -> ShardRunner:
        if self.runner is None:
            raise RuntimeError("LensWorker used before load()")
        return self.runner

    def compute(self, task: Shard) -> ComputedShard:
        """The device part of a shard (forward, capture, lens, copies to the host)."""
        start = time.perf_counter()
        runner = self._runner()
        stats = runner.compute(task)
        return ComputedShard(task, stats, time.perf_counter() - start, runner.batch_tokens)

    def finish(self, computed: ComputedShard) -> ShardResult:
        """The host part of a shard: rows and partial aggregates (may run on another thread)."""
        start = time.perf_counter()
        table, partials = self._runner().finish(computed.stats)
        task = computed.task
        seconds = computed.seconds + time.perf_counter() - start
        return ShardResult(
            task.index,
            table,
            partials,
            task.n_tokens,
            seconds,
            table.num_rows,
            batch_tokens=computed.batch_tokens,
        )

    def stage(self, result: ShardResult, path: Path) -> ShardResult:
        """Write ``result``'s rows as the part file ``path`` and return it without them.

        Under Ray each actor writes its own parts into the run directory (on storage shared with
        the driver) and encodes the shard's manifest line, so that the driver only renames the
        part and appends the line.
        """
        start = time.perf_counter()
        write_part(result.table, path)
        written = replace(result, seconds=result.seconds + time.perf_counter() - start)
        line = manifest_line(result.index, written.manifest_entry())
        return replace(written, table=None, partials=None, staged=path, manifest_line=line)

    def check_run_dir(self, probe: Path, answer: Path) -> str:
        """Read the driver's ``probe`` file and write what it says to ``answer``.

        The Ray driver checks with this, before any work, that a worker sees the run directory the
        driver writes and can write into it (both are needed for ``stage``).

        Returns:
            What the probe holds, or a sentence saying why it could not be read or answered.
        """
        try:
            text = probe.read_text()
            answer.write_text(text)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return text

    def run_shard(self, task: Shard) -> ShardResult:
        """Compute one shard's rows and partial aggregates."""
        return self.finish(self.compute(task))

    def shutdown(self) -> None:
        """Release the model and any device memory."""
        self.runner = None
        self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
