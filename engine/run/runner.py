"""Run the lens over a shard: batches of windows through the pipeline, then rows and partials.

``ShardRunner`` is device- and executor-agnostic: the local executor and Ray actors both hold one
(inside the worker) and call ``run_shard`` with a planned ``Shard`` of ``WindowTask``s. The work is
split by job:

* :mod:`~codelens.engine.run.request`: the ``lens`` spec resolved against the model;
* :mod:`~codelens.engine.run.pipeline`: capture and lens statistics of a batch of windows;
* :mod:`~codelens.engine.run.rows`: the Arrow rows;
* :mod:`~codelens.engine.run.aggregates`: the mergeable partial aggregates for ``summary.json``.

Each row also carries where its token is in the source (``line``, ``byte_start``, ``byte_end``,
syntax ``category``): planned with the window (``WindowTask.spans``), so a worker never
re-tokenizes or re-lexes.

Lens variants (``lens.sites``, ``lens.decoder_blocks``): the ``attn`` site adds, for each selected
layer l >= 1, the residual stream inside block l right after attention (captured as the input of
the block's pre-MLP norm, ``model.surgery.attn_residual_modules``); its rows carry ``site = attn``
and are statistics like any other (KL against the final *block* layer L). With
``decoder_blocks = n``, every captured residual before the last n blocks (block layers l < L - n,
attn layers l <= L - n) is run through them, as a full ``[B, S, d]`` sequence with the arguments
the forward pass gave them (``model.capture.BlockReplay``), before the head reads it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from codelens.engine.data.windows import Shard, WindowTask
from codelens.engine.model.loading import LoadedModel
from codelens.engine.run.aggregates import shard_partials
from codelens.engine.run.pipeline import LensBatch, LensPipeline, PendingBatch
from codelens.engine.run.request import resolve_lens
from codelens.engine.run.rows import lens_table
from codelens.engine.schemas import LensSpec

log = logging.getLogger(__name__)


def by_length(windows: Sequence[WindowTask]) -> list[int]:
    """Window indices, longest first (ties in window order): batches of similar lengths.

    A batch is padded to its longest window, so grouping windows of similar length computes
    less padding: a shard's full windows go together, and its documents' short last windows
    (or whole short files) together (``benchmarks/results/padding.md`` measures how much).
    """
    return sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))


def batches(windows: Sequence[WindowTask], batch_tokens: int) -> list[list[WindowTask]]:
    """Group consecutive windows so that ``len(batch) * longest <= batch_tokens``."""
    out: list[list[WindowTask]] = []
    current: list[WindowTask] = []
    longest = 0
    for w in windows:
        new_longest = max(longest, len(w.input_ids))
        if current and (len(current) + 1) * new_longest > batch_tokens:
            out.append(current)
            current, new_longest = [], len(w.input_ids)
        current.append(w)
        longest = new_longest
    if current:
        out.append(current)
    return out


@dataclass
class ShardStats:
    """A shard's statistics as its batches came off the device (longest windows first), on the
    host; ``assembled()`` puts them in window order.

    Kept apart so that the copy into window order (0.1 s of one core for a 64k-token shard at the
    Qwen2.5-Coder-7B row shape) runs on the host's thread while the device computes the next
    shard, not between two shards on the device's.

    Attributes:
        batches: the batches, in the order they ran (on a GPU, in pinned host memory); emptied by
            ``assembled``.
        order: ``order[j]``: the index, among the batches' windows in sequence, of window ``j``.
    """

    batches: tuple[LensBatch, ...]
    order: tuple[int, ...]
    _assembled: LensBatch | None = field(default=None, repr=False)

    def assembled(self) -> LensBatch:
        """One batch of the shard's windows in window order (``LensBatch.assemble``).

        The first call copies the batches and lets them go: on a GPU they are pinned host
        memory, which PyTorch keeps cached, so holding them until the shard is committed would
        pin a shard's statistics per shard in the host queue. Later calls return the same batch.
        """
        if self._assembled is None:
            self._assembled = LensBatch.assemble(self.batches, self.order)
            self.batches = ()
        return self._assembled


class ShardRunner:
    """Runs shards of a job through one loaded model.

    Args:
        lens: the job's ``lens`` section.
        loaded: the model from ``load_model`` (self-checked).
        batch_tokens: the most padded tokens in one forward pass (``execution.batch_tokens``).

    Raises:
        SpecError: the ``lens`` section does not fit the model (``resolve_lens``).
    """

    def __init__(self, lens: LensSpec, loaded: LoadedModel, *, batch_tokens: int) -> None:
        self.lens = resolve_lens(lens, loaded)
        self.pipeline = LensPipeline(loaded, self.lens)
        self.batch_tokens = batch_tokens
        # The implementation is proven against the torch path before any shard, as the head is
        # by the self-check (a no-op for the torch path itself).
        self.impl_check_max_abs_err = self.pipeline.check_impl()

    def compute(self, task: Shard) -> ShardStats:
        """The device part of a shard: every batch's statistics, on the host.

        Windows are batched longest first (``by_length``), so that little padding is computed;
        ``ShardStats.assembled`` (in ``finish``) puts them back in window order. Batch i + 1 is
        launched before batch i's copy to the host is awaited, so on a GPU the device never waits
        for the host between batches. A batch that runs out of device memory is split in two and
        retried (down to one window, which is then a real failure), and ``batch_tokens`` shrinks
        to what fitted, so later batches are planned smaller.
        """
        results: list[LensBatch] = []
        pending: PendingBatch | None = None
        order = by_length(task.windows)
        todo = deque(batches([task.windows[i] for i in order], self.batch_tokens))
        while todo:
            inputs = todo.popleft()
            try:
                launched = self.pipeline.launch(inputs)
            except torch.cuda.OutOfMemoryError:
                if len(inputs) == 1:
                    raise
                half = len(inputs) // 2
                todo.extendleft([inputs[half:], inputs[:half]])  # same order, smaller batches
                self._shrink(inputs)
                continue
            if pending is not None:
                results.append(pending.result())
            pending = launched
        if pending is not None:
            results.append(pending.result())
        # The batches hold the windows in ``order``: where each window went, for ``assembled``.
        return ShardStats(tuple(results), tuple(sorted(range(len(order)), key=order.__getitem__)))

    def _shrink(self, inputs: Sequence[WindowTask]) -> None:
        """After an out-of-memory batch: free the cache and plan at most half of its size."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        longest = max(len(w.input_ids) for w in inputs)
        padded = len(inputs) * longest
        smaller = max(longest, padded // 2)
        if smaller < self.batch_tokens:
            log.warning(
                "out of device memory in a batch of %d windows (%d padded tokens): split in two; "
                "batch_tokens %d -> %d for the rest of this worker's shards",
                len(inputs),
                padded,
                self.batch_tokens,
                smaller,
            )
            self.batch_tokens = smaller

    def finish(self, computed: ShardStats) -> tuple[pa.Table, dict[str, dict]]:
        """The host part of a shard: its statistics in window order, then its rows and partial
        aggregates (no device work)."""
        batch = computed.assembled()
        return lens_table(self.lens, batch), shard_partials(self.lens, batch)

    def run_shard(self, task: Shard) -> tuple[pa.Table, dict[str, dict]]:
        """Rows (layer-major, then document order) and partial aggregates of a shard.

        Returns:
            The rows, and the partials of ``codelens.engine.run.aggregates``: one per written
            layer (overall, by syntax category, by language, ...) and the convergence-layer
            histograms.
        """
        return self.finish(self.compute(task))
