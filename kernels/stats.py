"""What every lens implementation takes and returns.

Shapes: ``L`` lens layers (rows of the captured residual stream), ``T`` tokens, ``d`` model width,
``V`` vocabulary rows, ``k`` top-k, ``A`` look-ahead offsets, ``S`` token sets.

Per (layer l, token i) with ``p = softmax(z_l[i])``, ``q = softmax(z_final[i])`` and target ``t``:

* ``lse = logsumexp(z)``
* ``entropy = -sum p log p`` (nats)
* ``target_logprob = z[t] - lse`` (NaN without a target)
* ``target_rank = #{v : z[v] > z[t]}`` (0 = top-1; -1 without a target)
* ``kl_final = KL(q || p) = sum q (log q - log p)`` (0 at the final layer)
* ``topk_ids / topk_logprobs``: the k largest, descending, ties broken by the smaller id
* ``ahead_logprob / ahead_rank``: as target, for the tokens ``o`` positions ahead
* ``set_logmass[s] = log sum_{v in S_s} p(v)`` (-inf for a set with no ids)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class LensRequest:
    """Which statistics to compute.

    Attributes:
        k: number of top entries per row (>= 1).
        entropy: compute the entropy.
        kl_final: compute KL(final || layer); needs the final layer's residual rows.
        token_sets: ``(name, ids)`` pairs; ``ids`` is a 1-D int64 tensor of vocabulary ids.
    """

    k: int
    entropy: bool = True
    kl_final: bool = True
    token_sets: tuple[tuple[str, Tensor], ...] = ()

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


@dataclass
class LensStats:
    """Per-row lens statistics. Float tensors are fp32, integer tensors int32.

    Attributes:
        lse: ``[L, T]``.
        entropy: ``[L, T]`` or None when not requested.
        kl_final: ``[L, T]`` or None when not requested.
        target_logprob: ``[L, T]``.
        target_rank: ``[L, T]``.
        topk_ids: ``[L, T, k]``.
        topk_logprobs: ``[L, T, k]``.
        ahead_logprob: ``[L, T, A]``.
        ahead_rank: ``[L, T, A]``.
        set_logmass: ``[L, T, S]``.
        finite: ``[L, T]`` bool; False where the residual row had a NaN/inf (fp16 overflow). Such
            rows carry NaN statistics, rank -1 and top-k ids -1 instead of silent garbage.
    """

    lse: Tensor
    entropy: Tensor | None
    kl_final: Tensor | None
    target_logprob: Tensor
    target_rank: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor
    ahead_logprob: Tensor
    ahead_rank: Tensor
    set_logmass: Tensor
    finite: Tensor

    def to(self, device: torch.device | str) -> LensStats:
        """Move every tensor to ``device``."""
        return LensStats(
            **{
                f.name: (
                    None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                )
                for f in fields(self)
            }
        )


def empty_outputs(
    n_layers: int, n_tokens: int, request: LensRequest, n_cols: int, device: torch.device
) -> dict[str, Tensor]:
    """The output buffers every implementation fills and ``masked_stats`` assembles: ``lse,
    entropy, kl [L, T]``, ``lp, rank [L, T, n_cols]`` (target column first), ``topk_ids, topk_lp
    [L, T, k]`` and ``sets [L, T, S]``; fp32, ranks and ids int32."""
    shape, f32, i32 = (n_layers, n_tokens), torch.float32, torch.int32
    k, n_sets = request.k, len(request.token_sets)
    return {
        "lse": torch.empty(shape, dtype=f32, device=device),
        "entropy": torch.empty(shape, dtype=f32, device=device),
        "kl": torch.empty(shape, dtype=f32, device=device),
        "lp": torch.empty(*shape, n_cols, dtype=f32, device=device),
        "rank": torch.empty(*shape, n_cols, dtype=i32, device=device),
        "topk_ids": torch.empty(*shape, k, dtype=i32, device=device),
        "topk_lp": torch.empty(*shape, k, dtype=f32, device=device),
        "sets": torch.empty(*shape, n_sets, dtype=f32, device=device),
    }


def final_is_shared(hidden: Tensor, final_hidden: Tensor | None) -> bool:
    """Whether ``final_hidden`` is ``hidden[-1]`` itself (same storage and strides): the last
    layer is then its own KL reference."""
    return (
        final_hidden is not None
        and final_hidden.data_ptr() == hidden[-1].data_ptr()
        and final_hidden.stride() == hidden[-1].stride()
    )


def target_logprob(z_target: Tensor, lse: Tensor) -> Tensor:
    """``z_t - lse``, at most 0: the Triton kernels take ``z_t`` from the pre-pass's dot product,
    which may sit a rounding step above the logit the log-sum-exp saw."""
    return (z_target - lse).clamp_max(0.0)


def masked_stats(out: dict[str, Tensor], finite: Tensor, request: LensRequest) -> LensStats:
    """Assemble ``LensStats`` from an implementation's output buffers, flagging non-finite rows.

    Args:
        out: ``lse, entropy, kl [L, T]``, ``lp [L, T, 1 + A]`` and ``rank`` (target column first),
            ``topk_ids, topk_lp [L, T, k]``, ``sets [L, T, S]``; written in place.
        finite: ``[L, T]`` bool, False for rows whose residual had a NaN/inf: their statistics
            become NaN and their ranks and top-k ids -1.
        request: what was computed (entropy and KL are None when not requested).
    """
    bad = ~finite
    # masked_fill_ with the mask broadcast over trailing axes: no mask-to-index conversion (a
    # boolean index would be turned into indices, a device read on a GPU).
    fills = {"lse": torch.nan, "entropy": torch.nan, "kl": torch.nan, "lp": torch.nan}
    fills |= {"topk_lp": torch.nan, "sets": torch.nan, "rank": -1, "topk_ids": -1}
    for name, fill in fills.items():
        buf = out[name]
        buf.masked_fill_(bad.view(*bad.shape, *([1] * (buf.dim() - 2))), fill)
    return LensStats(
        lse=out["lse"],
        entropy=out["entropy"] if request.entropy else None,
        kl_final=out["kl"] if request.kl_final else None,
        target_logprob=out["lp"][..., 0],
        target_rank=out["rank"][..., 0],
        topk_ids=out["topk_ids"],
        topk_logprobs=out["topk_lp"],
        ahead_logprob=out["lp"][..., 1:],
        ahead_rank=out["rank"][..., 1:],
        set_logmass=out["sets"],
        finite=finite,
    )


PRECISIONS = ("model", "fp32")
"""How the lens multiplies rows by ``W_U``: ``"model"``, in the head's dtype where a GPU has
tensor cores for it (16-bit heads: rows rounded to it, as the model's own head rounds them; fp32
heads: TF32 in the Triton strategies), or ``"fp32"``, IEEE fp32 products of unrounded rows
(slower on a GPU; the torch path's fp32 heads take it unless the process set TF32 matmuls)."""


@contextlib.contextmanager
def float32_matmuls(mode: str | None):
    """``torch.set_float32_matmul_precision(mode)`` inside the block, restored after: ``"high"``
    lets fp32 CUDA matmuls take TF32 tensor cores, ``"highest"`` holds them to IEEE fp32 whatever
    the process set before; None leaves the setting alone. (A process-wide setting: a lens call
    runs its matmuls on one thread.)"""
    if mode is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` naming the choices when ``precision`` is not one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_inputs(
    hidden: Tensor,
    targets: Tensor,
    final_hidden: Tensor | None,
    request: LensRequest,
    vocab_size: int,
    d_model: int,
) -> None:
    """Validate the common arguments of every lens implementation (raises ValueError).

    ``targets`` and the token sets' ids may be on the host whatever ``hidden``'s device: their
    values are then checked there, with nothing to wait for (on a GPU, one device read each)."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [L, T, d], got shape {tuple(hidden.shape)}")
    n_layers, n_tokens, d = hidden.shape
    if d != d_model:
        raise ValueError(f"hidden width {d} does not match the head's d_model {d_model}")
    if targets.dim() != 2 or targets.shape[0] != n_tokens:
        raise ValueError(f"targets must be [T={n_tokens}, 1 + A], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.numel():
        low, high = value_range(targets)
        if high >= vocab_size or low < -1:
            raise ValueError(f"targets must be in [-1, {vocab_size}), got {low}..{high}")
    if request.k > vocab_size:
        raise ValueError(f"k={request.k} is larger than the vocabulary ({vocab_size} rows)")
    if request.kl_final:
        if final_hidden is None:
            raise ValueError("kl_final needs final_hidden, the final layer's residual rows [T, d]")
        if final_hidden.shape != (n_tokens, d):
            raise ValueError(
                f"final_hidden must be [{n_tokens}, {d}], got {tuple(final_hidden.shape)}"
            )
    for name, ids in request.token_sets:
        if ids.dim() != 1:
            raise ValueError(f"token set {name!r} must be a 1-D id tensor")
        if ids.numel():
            low, high = value_range(ids)
            if low < 0 or high >= vocab_size:
                raise ValueError(f"token set {name!r} has ids outside [0, {vocab_size})")


def value_range(t: Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer tensor. A host tensor is read through numpy, so no
    torch op runs on it; a device tensor costs one read (a wait for the device's queued work)."""
    if t.device.type == "cpu":
        values = t.detach().numpy()
        return int(values.min()), int(values.max())
    low, high = torch.aminmax(t)
    return tuple(torch.stack([low, high]).tolist())


def to_device_async(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``. A host tensor goes to a GPU through pinned memory without blocking: a
    copy from pageable memory would first wait for all the work the device has queued (the
    previous batch), so the host could not queue the next work behind it. The pinned copy is
    kept by torch's host allocator until the copy has run."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
