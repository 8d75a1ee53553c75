"""The lens pipeline: token ids in, per-row lens statistics out. Every entry point runs through it.

``codelens run`` (the shard runner), ``codelens plot`` and the notebook API (the grid, ``Lens``)
and ``codelens bench`` all call :class:`LensPipeline`, so a fix here reaches every one of them.

Per batch of model inputs (each: ``input_ids``, the last ``n_emit`` of which emit rows, and their
``targets``; a :class:`~codelens.engine.data.windows.WindowTask` is one), right-padded to the
longest::

    ids [B, S] --forward + capture hooks--> residual [n_slots, B*S, d]
        (--replay through the last n blocks, for lens.decoder_blocks = n--)
        --keep the emitted positions--> hidden [n_slots, T, d]     T = sum of n_emit
        --kernels.lens_stats(head, targets, final slot)--> LensStats [n_slots, T, ...]

The slot layout (which layers and sites, the final layer L last among the block slots) is the
:class:`~codelens.engine.run.request.ResolvedLens`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from codelens.engine.data.windows import target_columns
from codelens.engine.errors import SelfCheckError
from codelens.engine.model.capture import BlockReplay, ResidualCapture, RouterCapture
from codelens.engine.model.loading import PROBE_LENGTHS, PROBE_TEXTS, LoadedModel
from codelens.engine.run.request import ResolvedLens
from codelens.kernels import LensImpl, LensStats, lens_stats
from codelens.kernels.stats import to_device_async


class LensInput(Protocol):
    """One model input: ``input_ids``, of which the last ``n_emit`` emit rows with ``targets``."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def n_emit(self) -> int: ...

    @property
    def targets(self) -> np.ndarray:
        """``[n_emit, 1 + A]`` int: next token, then the look-ahead tokens; -1 past the end."""
        ...


@dataclass(frozen=True)
class TextInput:
    """A whole text as one model input: every token emits a row (the BOS, if any, does not).

    Attributes:
        input_ids: ``[bos] + ids``.
        n_emit: ``len(ids)``.
        targets: ``[n_emit, 1 + A]`` from the text itself (-1 past its end).
    """

    input_ids: tuple[int, ...]
    n_emit: int
    targets: np.ndarray

    @classmethod
    def of(cls, ids: Sequence[int], lookahead: Sequence[int], bos_id: int | None) -> TextInput:
        """The input for token ids ``ids`` (no BOS) with look-ahead offsets ``lookahead``."""
        columns = np.asarray(target_columns(ids, 0, len(ids), lookahead), dtype=np.int32)
        prefix = () if bos_id is None else (bos_id,)
        return cls(prefix + tuple(ids), len(ids), np.ascontiguousarray(columns.T))


@dataclass(frozen=True)
class LensBatch:
    """Lens statistics of a run of consecutive inputs, on the CPU, with what they were fed.

    Attributes:
        inputs: the inputs, in order; their emitted tokens are the T tokens below, in that order.
        stats: ``[n_slots, T, ...]`` (slot layout: the pipeline's ``ResolvedLens``).
        token_ids: ``[T]`` int64 the emitted input tokens.
        targets: ``[T, 1 + A]`` int64 their targets (column 0: the next token).
        routed: ``[L, T, k]`` int16 the experts block l's router chose (row l - 1; -1 for a
            dense block), or None without ``lens.router_topk``.
    """

    inputs: tuple[LensInput, ...]
    stats: LensStats
    token_ids: Tensor
    targets: Tensor
    routed: Tensor | None = None

    @staticmethod
    def assemble(batches: Sequence[LensBatch], order: Sequence[int] | None = None) -> LensBatch:
        """One batch of the inputs of ``batches`` (taken in sequence), in the order ``order``.

        Args:
            batches: at least one batch.
            order: ``order[j]`` is the index, among the batches' inputs in sequence, of the j-th
                input of the result (default: the inputs as they come).

        Each input's tokens are one contiguous run of its batch, so every tensor is copied once,
        a run at a time (a concatenation and then a gather by token would copy twice, the gather
        element by element: ~5x the time for a 64k-token shard).
        """
        if not batches:
            raise ValueError("LensBatch.assemble needs at least one batch")
        runs = []  # (batch, first token, tokens) of each input, in sequence
        for b, batch in enumerate(batches):
            start = 0
            for x in batch.inputs:
                runs.append((b, start, x.n_emit))
                start += x.n_emit
        order = list(range(len(runs))) if order is None else list(order)
        if sorted(order) != list(range(len(runs))):
            raise ValueError(
                f"LensBatch.assemble: order must name each of the {len(runs)} inputs once, "
                f"got {order}"
            )
        if len(batches) == 1 and order == list(range(len(runs))):
            return batches[0]
        n_tokens = sum(n for _, _, n in runs)

        def gather(tensors: Sequence[Tensor | None], dim: int) -> Tensor | None:
            if tensors[0] is None:
                return None
            out = tensors[0].new_empty(
                (*tensors[0].shape[:dim], n_tokens, *tensors[0].shape[dim + 1 :])
            )
            at = 0
            for j in order:
                b, start, n = runs[j]
                out.narrow(dim, at, n).copy_(tensors[b].narrow(dim, start, n))
                at += n
            return out

        inputs = [x for batch in batches for x in batch.inputs]
        stats = {
            f.name: gather([getattr(batch.stats, f.name) for batch in batches], 1)
            for f in fields(LensStats)
        }
        return LensBatch(
            tuple(inputs[j] for j in order),
            LensStats(**stats),
            gather([batch.token_ids for batch in batches], 0),
            gather([batch.targets for batch in batches], 0),
            gather([batch.routed for batch in batches], 1),
        )


CHECKED_STATISTICS = (
    "lse",
    "entropy",
    "kl_final",
    "target_logprob",
    "ahead_logprob",
    "set_logmass",
    "topk_logprobs",
)
"""The ``LensStats`` fields ``LensPipeline.check_impl`` compares: every continuous statistic
(ranks and top-k ids may differ between near-equal logits)."""

IMPL_CHECK_TOLERANCE_NATS = {True: 1e-3, False: 1e-1}
"""Allowed difference from the torch path at load (``LensPipeline.check_impl``), in nats: True for
fp32 operands multiplied in fp32 (an fp32 model off the GPU, or lens.precision fp32), False for
tensor-core operands (bf16/fp16 models, whose rows the kernels round to the model's dtype as its
own head does, and fp32 models on a GPU, which take TF32: 10 mantissa bits; kernels/DESIGN.md)."""


class LensPipeline:
    """Capture and lens for one loaded model and one resolved lens request.

    Args:
        loaded: the model from ``load_model`` (self-checked).
        lens: the request resolved against it (``resolve_lens``).
    """

    def __init__(self, loaded: LoadedModel, lens: ResolvedLens) -> None:
        self.loaded = loaded
        self.lens = lens
        # The backbone skips the LM head: its [tokens, V] logits are never read.
        backbone = loaded.parts.backbone
        self.model = loaded.model if backbone is None else backbone
        self.head = loaded.parts.head
        # A model split over several devices takes its token ids on the first (the embeddings')
        # and is read on the last (the head's): every captured layer is gathered there.
        self.input_device = loaded.input_device
        self.device = loaded.device
        self.dtype = loaded.dtype
        blocks = loaded.parts.blocks
        self.capture_hooks = ResidualCapture(
            blocks,
            lens.captured,
            attn_modules=lens.attn_modules,
            attn_layers=lens.attn_layers,
        )
        decoder_blocks = lens.spec.decoder_blocks
        self.replay = BlockReplay(blocks, decoder_blocks) if decoder_blocks else None
        self.routing = None if lens.routers is None else RouterCapture(lens.routers, lens.router_k)

    @torch.inference_mode()
    def capture(self, inputs: Sequence[LensInput]) -> tuple[Tensor, Tensor | None]:
        """Residual rows of the emitted tokens, ``[n_slots, T, d]``, and the experts each block's
        router chose for them, ``[L, T, k]`` int64 (None without ``lens.router_topk``), both on
        the head's device.

        Each block's output (and router choice) is copied into its buffer on the head's device
        as the forward pass produces it, whichever device the block runs on
        (``ResidualCapture``, ``RouterCapture``); the replayed blocks of ``lens.decoder_blocks``
        run on their own devices (accelerate's hooks move their inputs there) and their outputs
        are copied back into the buffer.
        """
        n, seq = len(inputs), max(len(x.input_ids) for x in inputs)
        ids = torch.full((n, seq), self.lens.pad_id, dtype=torch.long)
        mask = torch.zeros((n, seq), dtype=torch.long)
        keep = []
        for b, x in enumerate(inputs):
            length = len(x.input_ids)
            ids[b, :length] = torch.tensor(x.input_ids)
            mask[b, :length] = 1
            keep.append(torch.arange(b * seq + length - x.n_emit, b * seq + length))
        ids = to_device_async(ids, self.input_device)
        mask = to_device_async(mask, self.input_device)
        d = self.head.d_model
        recording = self.capture_hooks.recording(n, seq, d, self.dtype, self.device)
        with contextlib.ExitStack() as stack:
            if self.replay is not None:
                stack.enter_context(self.replay.recording())
            routed = None
            if self.routing is not None:
                routed = stack.enter_context(self.routing.recording(n, seq, self.device))
            buffer = stack.enter_context(recording)
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        if self.replay is not None:
            for slot in self.lens.decoded_slots:
                view = buffer[slot].view(n, seq, d)
                view.copy_(self.replay.replay(view))
        rows = to_device_async(torch.cat(keep), self.device)
        return buffer[:, rows], None if routed is None else routed[:, rows]

    @torch.inference_mode()
    def statistics(
        self, hidden: Tensor, targets: Tensor, impl: LensImpl | None = None
    ) -> LensStats:
        """``kernels.lens_stats`` of ``hidden [n_slots, T, d]`` against ``targets [T, 1 + A]``
        (on the head's device), KL against the final block slot, with ``impl`` (default: the
        job's)."""
        stats, _ = lens_stats(
            hidden,
            self.head,
            targets,  # on the host: validated there and copied without blocking
            self.lens.request,
            hidden[self.lens.final_slot],
            impl=self.lens.impl if impl is None else impl,
            precision=self.lens.spec.precision,
        )
        return stats

    def check_impl(self) -> float:
        """Prove the job's lens implementation against the torch path on the self-check's probe
        texts (``model.loading.PROBE_TEXTS``), as the self-check proves the head: the same
        residual rows through both, every continuous statistic compared (ranks and top-k ids may
        differ between near-equal logits).

        Returns:
            The largest difference in nats (0.0 when the job's implementation is the torch one).

        Raises:
            SelfCheckError: it exceeds ``IMPL_CHECK_TOLERANCE_NATS`` for the model's dtype, or
                the implementation raised on the probe batch (the message gives its reason).
        """
        if self.lens.impl is LensImpl.TORCH:
            return 0.0
        tokenizer = self.loaded.tokenizer
        probe = [
            TextInput.of(
                tokenizer(text, add_special_tokens=False)["input_ids"][:cap],
                self.lens.spec.lookahead,
                tokenizer.bos_token_id,
            )
            for text, cap in zip(PROBE_TEXTS, PROBE_LENGTHS, strict=True)
        ]
        hidden, _ = self.capture(probe)
        targets = torch.from_numpy(np.concatenate([x.targets for x in probe])).long()
        try:
            mine = self.statistics(hidden, targets)
        except torch.cuda.OutOfMemoryError:
            raise  # the device is full, not the implementation broken: the caller's to handle
        except Exception as error:
            # A kernel that cannot build or run here (no C compiler for Triton's launcher, a GPU
            # it does not support, a bad build): stop at load with its reason and the way out.
            reason = (str(error).strip().splitlines() or [""])[0][:300]
            raise SelfCheckError(
                f"lens.impl {self.lens.impl.value!r} failed on a probe batch "
                f"({type(error).__name__}: {reason}); set lens.impl: torch to run, and report "
                "the model and device"
            ) from error
        reference = self.statistics(hidden, targets, LensImpl.TORCH)
        err = 0.0
        for name in CHECKED_STATISTICS:
            a, b = getattr(mine, name), getattr(reference, name)
            if a is None:
                continue
            both = torch.isfinite(a) & torch.isfinite(b)
            if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                err = math.inf
            elif both.any():
                err = max(err, (a[both].double() - b[both].double()).abs().max().item())
        # IEEE fp32 products on both sides: lens.precision fp32, or an fp32 model off the GPU (on
        # it the Triton kernels take TF32 for fp32 operands in "model" precision).
        exact = self.lens.spec.precision == "fp32" or (
            self.dtype == torch.float32 and hidden.device.type != "cuda"
        )
        bound = IMPL_CHECK_TOLERANCE_NATS[exact]
        if not err <= bound:
            raise SelfCheckError(
                f"lens.impl {self.lens.impl.value!r} differs from the torch path by {err:.3g} "
                f"nats on a probe batch (allowed {bound:g} in {self.dtype}); set lens.impl: torch "
                "to run, and report the model and device"
            )
        return err

    def launch(self, inputs: Sequence[LensInput]) -> PendingBatch:
        """Capture and lens for a batch, with the copy to the host started but not awaited.

        On a GPU the kernels are queued and the statistics are copied into pinned host buffers
        without blocking, so the caller can launch the next batch before it waits for this one
        (:meth:`PendingBatch.result`). On a CPU everything has happened when this returns.
        """
        hidden, routed = self.capture(inputs)
        targets = torch.from_numpy(np.concatenate([x.targets for x in inputs])).long()
        stats = self.statistics(hidden, targets)
        token_ids = torch.tensor(
            [i for x in inputs for i in x.input_ids[len(x.input_ids) - x.n_emit :]]
        )
        if routed is not None:
            routed = routed.to(torch.int16)  # expert ids < 32768 (the widest MoE has 384)
        host, host_routed, done = _copy_to_host(stats, routed)
        return PendingBatch(LensBatch(tuple(inputs), host, token_ids, targets, host_routed), done)

    def __call__(self, inputs: Sequence[LensInput]) -> LensBatch:
        """Capture, lens and copy to the CPU for a batch of inputs."""
        return self.launch(inputs).result()


@dataclass(frozen=True)
class PendingBatch:
    """A batch whose statistics may still be on their way to the host (``LensPipeline.launch``)."""

    batch: LensBatch
    done: torch.cuda.Event | None

    def result(self) -> LensBatch:
        """The batch, once its device-to-host copies have finished."""
        if self.done is not None:
            self.done.synchronize()
        return self.batch


def _copy_to_host(
    stats: LensStats, routed: Tensor | None
) -> tuple[LensStats, Tensor | None, torch.cuda.Event | None]:
    """``stats`` and ``routed`` on the CPU: as they are when already there, else copied into
    pinned buffers on the current stream without blocking, with an event that marks the copies'
    end."""
    tensors = [getattr(stats, f.name) for f in fields(LensStats)]
    device = next(t.device for t in tensors if t is not None)
    if device.type != "cuda":
        return stats, routed, None

    def pinned(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    host = {f.name: pinned(t) for f, t in zip(fields(LensStats), tensors, strict=True)}
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return LensStats(**host), pinned(routed), done
