"""The float64 oracle: full logits, ``log_softmax``, straight from the definitions.

It materialises ``[L, T, V]`` in float64, so it is for tests and small probes only. Every other
implementation is checked against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from codelens.kernels.head import Head
from codelens.kernels.stats import LensRequest, LensStats, check_inputs, to_device_async


def lens_stats_naive(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    request: LensRequest,
    final_hidden: Tensor | None = None,
) -> LensStats:
    """Lens statistics from full float64 logits.

    Args:
        hidden: ``[L, T, d]`` residual rows.
        head: the model's read-out path.
        targets: ``[T, 1 + A]`` int; column 0 the next token, column j the token ``lookahead[j-1]``
            positions ahead; -1 where there is none. On the host or on ``hidden``'s device; on the
            host (as the pipeline passes them) they are checked without waiting for the device
            and copied without blocking.
        request: what to compute.
        final_hidden: ``[T, d]`` the final layer's rows (for ``kl_final``).

    Returns:
        LensStats with fp32 / int32 tensors (computed in float64, rounded at the end).
    """
    check_inputs(hidden, targets, final_hidden, request, head.vocab_size, head.d_model)
    targets = to_device_async(targets, hidden.device)
    f64 = torch.float64
    z = head.logits(hidden.to(f64), f64)  # [L, T, V]
    z_final = head.logits(final_hidden.to(f64), f64) if request.kl_final else None
    stats = lens_stats_from_logits(z, targets, request, z_final)
    stats.finite = torch.isfinite(hidden).all(-1)
    return stats


def lens_stats_from_logits(
    z: Tensor, targets: Tensor, request: LensRequest, z_final: Tensor | None = None
) -> LensStats:
    """Lens statistics of given logits ``z [L, T, V]`` (computed in float64).

    Args:
        z: lens logits, already post-processed.
        targets: ``[T, 1 + A]`` as in ``lens_stats_naive``.
        request: what to compute.
        z_final: ``[T, V]`` the final layer's logits (for ``kl_final``).
    """
    f64 = torch.float64
    z = z.to(f64)
    finite = torch.isfinite(z).all(-1)  # [L, T]
    logp = torch.log_softmax(z, -1)
    lse = torch.logsumexp(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)

    kl = None
    if request.kl_final:
        logq = torch.log_softmax(z_final.to(f64), -1)  # [T, V]
        kl = (logq.exp() * (logq - logp)).sum(-1).clamp_min(0.0)

    tgt = targets.long()
    has = tgt >= 0  # [T, 1 + A]
    safe = tgt.clamp_min(0)
    z_t = z.gather(-1, safe.expand(z.shape[0], -1, -1))  # [L, T, 1 + A]
    lp_t = z_t - lse[..., None]
    rank_t = (z[..., None, :] > z_t[..., None]).sum(-1)  # [L, T, 1 + A]
    lp_t = torch.where(has, lp_t, torch.nan)
    rank_t = torch.where(has, rank_t, -1)

    # Top-k with ties to the smaller id: a stable descending sort keeps ids ascending among equals.
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., : request.k]
    topk_lp = logp.gather(-1, order)

    set_lm = (
        torch.stack(
            [
                torch.logsumexp(logp[..., ids.long()], -1)
                if ids.numel()
                else torch.full(lse.shape, -torch.inf, dtype=f64)
                for _, ids in request.token_sets
            ],
            -1,
        )
        if request.token_sets
        else lse.new_zeros(lse.shape + (0,))
    )

    stats = LensStats(
        lse=lse.float(),
        entropy=entropy.float() if request.entropy else None,
        kl_final=kl.float() if kl is not None else None,
        target_logprob=lp_t[..., 0].float(),
        target_rank=rank_t[..., 0].int(),
        topk_ids=order.int(),
        topk_logprobs=topk_lp.float(),
        ahead_logprob=lp_t[..., 1:].float(),
        ahead_rank=rank_t[..., 1:].int(),
        set_logmass=set_lm.float(),
        finite=finite,
    )
    return stats
