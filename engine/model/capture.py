"""Capture the residual stream with hooks on the decoder blocks.

Layer 0 is the input of the first block (the embedding output after any embedding scaling: Gemma's
``sqrt(d)``, Granite's ``embedding_multiplier``), layer ``l`` the output of block ``l``, layer ``L``
the last block's output *before* the final norm. HF's ``output_hidden_states`` is not used: its
last entry is already normalised, and it keeps every layer alive at once.

Hooks copy each selected layer into one preallocated ``[n_selected, B * S, d]`` buffer as the
forward pass runs, so the model's own activations can be freed layer by layer. The buffer may live
on another device than the blocks (a model split over several GPUs: the lens head's device); each
copy then moves that layer's rows across.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from codelens.engine.errors import UnsupportedArchitectureError


def _first_tensor(value: Any) -> Tensor:
    """Block outputs are a tensor (transformers >= 5) or a tuple whose first entry is one."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(value)}")


class ResidualCapture:
    """Context manager that records selected residual-stream layers during forward passes.

    Args:
        blocks: the model's decoder blocks, in order (``L`` of them).
        layers: layer indices in ``0..L`` to record, in the order they are stored.
        attn_modules: per block, the module whose input is the post-attention residual stream
            (``model_surgery.attn_residual_modules``); needed only with ``attn_layers``.
        attn_layers: layers ``1..L`` whose post-attention residual to record (``attn`` site),
            stored after the ``layers`` slots.

    Usage::

        cap = ResidualCapture(blocks, layers=[0, 6, 12])
        with cap.recording(batch_size, seq_len, d, dtype, device) as buf:  # [3, B * S, d]
            model(input_ids, attention_mask=mask)
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        layers: Sequence[int],
        *,
        attn_modules: Sequence[nn.Module] | None = None,
        attn_layers: Sequence[int] = (),
    ) -> None:
        n_blocks = len(blocks)
        bad = [layer for layer in layers if not 0 <= layer <= n_blocks]
        bad += [layer for layer in attn_layers if not 1 <= layer <= n_blocks]
        if bad:
            raise ValueError(
                f"layer indices {bad} are out of range: this model has layers 0..{n_blocks}"
            )
        if attn_layers and (attn_modules is None or len(attn_modules) != n_blocks):
            raise ValueError("attn_layers needs one attn module per block")
        self.blocks = list(blocks)
        self.layers = list(layers)
        self.attn_modules = list(attn_modules or [])
        self.attn_layers = list(attn_layers)
        self._buffer: Tensor | None = None

    @property
    def n_slots(self) -> int:
        """Rows of the buffer: the block layers, then the attn-site layers."""
        return len(self.layers) + len(self.attn_layers)

    def recording(
        self, batch: int, seq: int, d_model: int, dtype: torch.dtype, device: torch.device | str
    ) -> _Recording:
        """Allocate the ``[n_selected, batch * seq, d]`` buffer and hook the blocks while in use."""
        buffer = torch.empty(self.n_slots, batch * seq, d_model, dtype=dtype, device=device)
        return _Recording(self, buffer)

    def _store(self, slot: int, hidden: Tensor) -> None:
        assert self._buffer is not None
        self._buffer[slot].view(hidden.shape).copy_(hidden)

    def _hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for slot, layer in enumerate(self.layers):
            if layer == 0:

                def pre_hook(module, args, kwargs, slot=slot):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    self._store(slot, hidden)

                handles.append(self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def post_hook(module, args, output, slot=slot):
                    self._store(slot, _first_tensor(output))

                handles.append(self.blocks[layer - 1].register_forward_hook(post_hook))
        for i, layer in enumerate(self.attn_layers):

            def attn_hook(module, args, kwargs, slot=len(self.layers) + i):
                hidden = args[0] if args else next(iter(kwargs.values()))
                self._store(slot, hidden)

            module = self.attn_modules[layer - 1]
            handles.append(module.register_forward_pre_hook(attn_hook, with_kwargs=True))
        return handles


class _Recording:
    def __init__(self, capture: ResidualCapture, buffer: Tensor) -> None:
        self.capture = capture
        self.buffer = buffer
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Tensor:
        self.capture._buffer = self.buffer
        self.handles = self.capture._hooks()
        return self.buffer

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.capture._buffer = None


class BlockReplay:
    """Runs captured residuals through the model's last ``n`` blocks ("last blocks as decoder").

    During the forward pass (inside :meth:`recording`) it records the ``(args, kwargs)`` each of
    the last ``n`` blocks is called with (attention masks, positions, rotary embeddings, whatever
    the family passes); :meth:`replay` then runs any ``[B, S, d]`` residual through those blocks
    with the same arguments, as the model would have run it had it arrived at block ``L - n``.

    In a model split over several devices each replayed block runs on its own device: calling
    the block goes through the device hook accelerate attached to it, which moves the residual
    and the recorded arguments there (the recorded ones are those the block was *called* with,
    before that move), so the replay takes the path the forward pass took.

    Args:
        blocks: the model's decoder blocks, in order (``L`` of them).
        n: how many of the last blocks to replay (``1 <= n < L``).
    """

    def __init__(self, blocks: Sequence[nn.Module], n: int) -> None:
        if not 1 <= n < len(blocks):
            raise ValueError(f"decoder blocks must be in 1..{len(blocks) - 1}, got {n}")
        self.blocks = list(blocks)[len(blocks) - n :]
        self._calls: list[tuple[tuple, dict]] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the last blocks' call arguments during the forward pass inside the block."""
        self._calls = []

        def record(module, args, kwargs):
            self._calls.append((args, kwargs))

        handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def replay(self, hidden: Tensor) -> Tensor:
        """``hidden [B, S, d]`` run through the recorded blocks; returns ``[B, S, d]``."""
        if len(self._calls) != len(self.blocks):
            raise RuntimeError(
                f"lens.decoder_blocks: recorded {len(self._calls)} calls of the last "
                f"{len(self.blocks)} blocks"
            )
        x = hidden
        for block, (args, kwargs) in zip(self.blocks, self._calls, strict=True):
            if args:
                out = block(x, *args[1:], **kwargs)
            else:
                out = block(**{**kwargs, "hidden_states": x})
            x = _first_tensor(out)
        return x


class RouterCapture:
    """Records the experts each block's router chose during forward passes (MoE models).

    Args:
        routers: per block, its router module (``model.surgery.router_modules``), None for a
            dense block.
        top_k: experts chosen per token.

    ``recording(batch, seq, device)`` yields an int64 buffer ``[L, batch * seq, top_k]``: row
    ``l - 1`` holds block ``l``'s choices, -1 for dense blocks.
    """

    def __init__(self, routers: Sequence[nn.Module | None], top_k: int) -> None:
        self.routers = list(routers)
        self.top_k = top_k

    @contextlib.contextmanager
    def recording(self, batch: int, seq: int, device: torch.device | str) -> Iterator[Tensor]:
        buffer = torch.full(
            (len(self.routers), batch * seq, self.top_k), -1, dtype=torch.long, device=device
        )

        def hook(module, args, output, index):
            chosen = output[-1] if isinstance(output, (tuple, list)) else None
            if (
                not isinstance(chosen, Tensor)
                or chosen.dtype.is_floating_point
                or chosen.numel() != batch * seq * self.top_k
            ):
                raise UnsupportedArchitectureError(
                    f"the router {type(module).__name__} of block {index + 1} did not return "
                    f"the chosen expert ids as its last output ([tokens, {self.top_k}] integers); "
                    "lens.router_topk cannot read this model: set lens.router_topk: false"
                )
            buffer[index].copy_(chosen.reshape(batch * seq, self.top_k))

        handles = [
            router.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
            for i, router in enumerate(self.routers)
            if router is not None
        ]
        try:
            yield buffer
        finally:
            for handle in handles:
                handle.remove()
