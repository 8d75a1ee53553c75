"""Vocab-chunked lens statistics in plain torch: the fallback on any device and the kernel's
reference.

The ``[rows, V]`` logits never exist at once: rows are taken in blocks of ``T_b`` tokens (all lens
layers of those tokens together, so each token's final-layer row sits beside its other layers), and
the vocabulary in chunks of ``V_c``; working memory is ``O(L * T_b * V_c)``, set by a byte budget,
independent of the vocabulary size and of the number of rows.

Per row, one online pass over the vocabulary keeps (with ``m`` the running max of the logits
``z``)::

    s = sum e^{z-m}                      lse      = m + log s
    t = sum e^{z-m} (z-m)                entropy  = log s - t / s
    u = sum e^{zq-mq} (zq - z)           kl_final = u / sq + lse - lse_q      (KL(q || p))
    c_j = #{v : z_v > z_tj}              rank_j   = c_j (the target itself excluded)
    g_s = sum_{v in S_s} e^{z-m}         set_s    = log g_s - log s

and a running top-k of packed int64 keys ``(order-preserving int32 of z) << 32 | (2^31-1 - id)``,
whose descending order is (value desc, id asc): exact and deterministic tie-breaking for free.
Each chunk computes ``exp(z - m)`` once; all of the sums above reuse it.

The target's logit used for the *rank* threshold is precomputed with a gathered dot product; the
target's *log-prob* uses the logit of the chunk that holds it (the same arithmetic as ``lse``, so
``logprob <= 0`` always), and the target never counts itself even where the two differ by a rounding
step. Ranks are therefore exact except against other entries within a rounding step of the target.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from codelens.kernels.head import Head
from codelens.kernels.stats import (
    LensRequest,
    LensStats,
    check_inputs,
    check_precision,
    empty_outputs,
    final_is_shared,
    float32_matmuls,
    masked_stats,
    to_device_async,
)

_LOW31 = 0x7FFFFFFF
DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_BUDGET_BYTES = 256 << 20
"""Working-memory bound on a CPU (and the floor elsewhere): caches, not capacity, limit there."""
CUDA_BUDGET_FRACTION = 0.25
"""On a CUDA device the bound is this share of the memory free when the call starts..."""
CUDA_BUDGET_MAX_BYTES = 8 << 30
"""...at most this much: 8 GiB holds a token block of hundreds of tokens x 29 layers x 8192
vocabulary entries, enough for the matmuls to run at full speed."""
# Bytes per (row, vocab entry) of live memory in one chunk step: the reused z and e buffers
# (fp32), a comparison mask, the bias/soft-cap copy of z when the head has one, and slack for
# top-k and the boundary-tie fallback's packed keys.
_BYTES_PER_LOGIT = 24


def pack_keys(z: Tensor, first_id: int) -> Tensor:
    """Pack fp32 values ``z [..., n]`` with ids ``first_id + arange(n)`` into sortable int64
    keys."""
    ids = torch.arange(first_id, first_id + z.shape[-1], device=z.device, dtype=torch.int64)
    return pack_ids(z, ids)


def pack_ids(values: Tensor, ids: Tensor) -> Tensor:
    """Sortable int64 keys ``(order-preserving int32 of value) << 32 | (2^31-1 - id)`` of fp32
    ``values`` with their ``ids`` (broadcast): descending order is (value desc, id asc)."""
    bits = (values + 0.0).contiguous().view(torch.int32)  # +0.0 folds -0.0 into +0.0
    key = torch.where(bits < 0, bits ^ _LOW31, bits).to(torch.int64)
    return (key << 32) | (_LOW31 - ids.to(torch.int64))


def unpack_keys(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of ``pack_keys``: (fp32 values, int64 ids)."""
    key = (packed >> 32).to(torch.int32)
    values = torch.where(key < 0, key ^ _LOW31, key).view(torch.float32)
    ids = _LOW31 - (packed & 0xFFFFFFFF)
    return values, ids


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b, -1)`` for ``[..., n]`` tensors, as a batched matrix product (no temporary)."""
    n = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, n), b.reshape(-1, n, 1)).view(a.shape[:-1])


def _count_greater(z: Tensor, threshold: Tensor) -> Tensor:
    """``#(z > threshold)`` along the last dim; ``threshold`` broadcasts as ``[..., 1]``."""
    mask = z > threshold
    if mask.device.type == "cpu":
        # numpy counts a bool mask with SIMD popcounts, ~4x faster than torch's bool sum on CPU.
        return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=-1))
    return mask.sum(-1)


def merge_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of a small candidate set ``[..., n]``, ordered (value desc, id asc), exactly."""
    keys = pack_ids(values, ids).topk(min(k, values.shape[-1]), -1).values
    return unpack_keys(keys)


def chunk_topk(
    z: Tensor, k: int, first_id: int, *, sync_free: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Top-k of one vocabulary chunk ``z [..., Vc]`` with ties broken by the smaller id.

    ``torch.topk`` on floats is fast but does not define which of several equal values it keeps.
    On a CPU, asking for k + 1 tells whether the k-th value is tied with a value left out; only
    such rows (rare: an exact tie at the boundary) are redone with packed int64 keys, which are
    exact. On other devices (``sync_free``, default: off the CPU) the packed keys are used for
    every row, so nothing waits for the device. Ties *inside* the selected set are ordered
    exactly by ``merge_topk``. Returns ``(values [..., k], ids [..., k])``.
    """
    n = z.shape[-1]
    if k >= n:
        ids = torch.arange(first_id, first_id + n, device=z.device).expand(z.shape)
        return z, ids
    if sync_free is None:
        sync_free = z.device.type != "cpu"
    if sync_free:
        # Off the CPU, asking whether a row has a boundary tie would wait for the device: the
        # packed keys are exact for every row, at the price of an int64 top-k.
        return unpack_keys(pack_keys(z, first_id).topk(k, -1).values)
    values, idx = z.topk(k + 1, -1)
    boundary_tie = values[..., k - 1] == values[..., k]
    values, ids = values[..., :k], idx[..., :k] + first_id
    if boundary_tie.any():
        rows = boundary_tie.nonzero(as_tuple=True)
        exact = pack_keys(z[rows], first_id).topk(k, -1).values
        tie_values, tie_ids = unpack_keys(exact)
        values, ids = values.clone(), ids.clone()
        values[rows], ids[rows] = tie_values, tie_ids
    return values, ids


def _rescale(alpha_base: Tensor, m_old: Tensor, m_new: Tensor) -> Tensor:
    """``exp(m_old - m_new)``, 0 where nothing was accumulated yet (``m_old = -inf``)."""
    return torch.where(
        torch.isneginf(m_old), torch.zeros_like(alpha_base), torch.exp(m_old - m_new)
    )


_MM_OUT_DTYPE: bool | None = None
"""Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for 16-bit CUDA operands (torch >= 2.9;
found out on first use)."""


def matmul_fp32(x: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """``out [..., n] = x [..., d] @ w [n, d]^T`` with fp32 accumulation and output; returns out.

    ``x`` is fp32 (or ``w``'s dtype). 16-bit ``w`` on a GPU multiplies in its dtype: cuBLAS with an
    fp32 result (``x`` must then hold values representable in it, as the rounded rows do).
    Elsewhere, or on a torch without ``out_dtype``, the operands are widened first, which is exact
    for 16-bit values (their products are exact in fp32; only the accumulation order differs).
    """
    global _MM_OUT_DTYPE
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    if w.dtype == torch.float32:
        torch.mm(flat_x.float(), w.T, out=flat_out)
        return out
    if x.is_cuda and _MM_OUT_DTYPE is not False:
        try:
            torch.mm(flat_x.to(w.dtype), w.T, out_dtype=torch.float32, out=flat_out)
            _MM_OUT_DTYPE = True
            return out
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE = False
    torch.mm(flat_x.float(), w.float().T, out=flat_out)
    return out


def default_budget_bytes(device: torch.device) -> int:
    """The working-memory bound of ``lens_stats_torch`` on ``device``.

    ``DEFAULT_BUDGET_BYTES`` on a CPU. On a CUDA device ``CUDA_BUDGET_FRACTION`` of its free
    memory, between ``DEFAULT_BUDGET_BYTES`` and ``CUDA_BUDGET_MAX_BYTES``: a CPU-sized budget
    there gives blocks of a few dozen tokens and thousands of small steps per batch.
    """
    if device.type != "cuda":
        return DEFAULT_BUDGET_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(CUDA_BUDGET_MAX_BYTES, max(DEFAULT_BUDGET_BYTES, free * CUDA_BUDGET_FRACTION)))


def lens_stats_torch(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    request: LensRequest,
    final_hidden: Tensor | None = None,
    *,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    budget_bytes: int | None = None,
    precision: str = "model",
) -> LensStats:
    """Lens statistics with working memory bounded by ``budget_bytes``.

    Args:
        hidden: ``[L, T, d]`` residual rows, any float dtype, on any device.
        head: the model's read-out path (same device as ``hidden``).
        targets: ``[T, 1 + A]`` int; column 0 the next token, column j the token ``lookahead[j-1]``
            positions ahead; -1 where there is none. On the host or on ``hidden``'s device; on the
            host (as the pipeline passes them) they are checked without waiting for the device
            and copied without blocking.
        request: what to compute.
        final_hidden: ``[T, d]`` the final layer's rows, needed for ``kl_final``. When it is the
            same storage as ``hidden[-1]`` its logits are reused instead of recomputed.
        vocab_chunk: vocabulary entries per step.
        budget_bytes: bound on the step temporaries; sets the token block size (default:
            ``default_budget_bytes`` of the device).
        precision: ``"model"`` (on a GPU a 16-bit head multiplies rows rounded to its dtype, as
            the model's head does) or ``"fp32"`` (unrounded rows, the head widened to fp32).
            Off the GPU, and for fp32 heads, both are IEEE fp32.

    Returns:
        LensStats on ``hidden``'s device.
    """
    check_precision(precision)
    check_inputs(hidden, targets, final_hidden, request, head.vocab_size, head.d_model)
    targets = to_device_async(targets, hidden.device)
    n_layers, n_tokens, _ = hidden.shape
    n_vocab = head.vocab_size
    device = hidden.device
    vocab_chunk = max(1, min(vocab_chunk, n_vocab))
    if budget_bytes is None:
        budget_bytes = default_budget_bytes(device)
    rows_per_step = max(1, budget_bytes // (vocab_chunk * _BYTES_PER_LOGIT))
    # Each token set's ids, split by vocabulary chunk once (one host round trip per call): the
    # chunk loop then indexes with ready tensors and never waits for the device.
    set_chunks = _ids_by_chunk(request.token_sets, n_vocab, vocab_chunk, device)
    token_block = max(1, rows_per_step // (n_layers + 1))

    final_is_last = final_is_shared(hidden, final_hidden)
    finite = torch.isfinite(hidden).all(-1)  # [L, T]
    n_cols = targets.shape[1]
    out = empty_outputs(n_layers, n_tokens, request, n_cols, device)
    # "fp32" is IEEE even where the process asked torch for TF32 matmuls.
    with float32_matmuls("highest" if precision == "fp32" else None):
        for t0 in range(0, n_tokens, token_block):
            block = slice(t0, min(n_tokens, t0 + token_block))
            _token_block(
                hidden[:, block],
                finite[:, block],
                final_hidden[block] if request.kl_final else None,
                final_is_last,
                targets[block].long(),
                head,
                request,
                vocab_chunk,
                set_chunks,
                {name: tensor[:, block] for name, tensor in out.items()},
                precision,
            )
    return masked_stats(out, finite, request)


def _ids_by_chunk(
    token_sets: tuple[tuple[str, Tensor], ...], n_vocab: int, vocab_chunk: int, device
) -> list[list[Tensor]]:
    """Per vocabulary chunk, per token set: the set's ids in the chunk, relative to its start."""
    chunks: list[list[Tensor]] = []
    host = [ids.detach().cpu() for _, ids in token_sets]
    for v0 in range(0, n_vocab, vocab_chunk):
        v1 = min(n_vocab, v0 + vocab_chunk)
        chunks.append([to_device_async(ids[(ids >= v0) & (ids < v1)] - v0, device) for ids in host])
    return chunks


def _token_block(
    hidden: Tensor,
    finite: Tensor,
    final_hidden: Tensor | None,
    final_is_last: bool,
    targets: Tensor,
    head: Head,
    request: LensRequest,
    vocab_chunk: int,
    set_chunks: list[list[Tensor]],
    out: dict[str, Tensor],
    precision: str,
) -> None:
    """All statistics for one block of tokens (all layers), written into the ``out`` views.

    Nothing in the chunk loop reads a device value on the host, so on a GPU the loop only queues
    kernels."""
    n_layers, n_tok, _ = hidden.shape
    n_vocab = head.vocab_size
    fp32 = torch.float32
    # Rows with a NaN/inf are zeroed so they cannot poison shared reductions; they are masked out
    # of the results by the caller.
    x = torch.where(finite[..., None], head.norm.apply(hidden), 0.0)  # [L, Tb, d]
    # On a GPU a 16-bit head multiplies in its own dtype (tensor cores, fp32 accumulation and
    # output), as the model's head does; elsewhere, for fp32 heads and in "fp32", in fp32.
    operand = head.unembed.dtype if x.is_cuda and precision == "model" else fp32
    if operand != fp32:
        x = x.to(operand).to(fp32)  # the rounded rows, so thresholds and logits agree
    xq = None
    if final_hidden is not None and not final_is_last:
        xq = head.norm.apply(final_hidden).to(operand).to(fp32)
        xq = torch.where(torch.isfinite(xq).all(-1, keepdim=True), xq, 0.0)  # [Tb, d]

    # Thresholds for the ranks: each target's logit by a gathered dot product.
    has_target = targets >= 0  # [Tb, C]
    tgt = targets.clamp_min(0)
    w_t = head.unembed[tgt].to(fp32)  # [Tb, C, d]
    b_t = head.unembed_bias[tgt] if head.unembed_bias is not None else None
    z_thresh = head.postprocess(torch.einsum("ltd,tcd->ltc", x, w_t), b_t)  # [L, Tb, C]

    neg_inf = torch.full((n_layers, n_tok), -torch.inf, device=x.device)
    m, s, t = neg_inf.clone(), torch.zeros_like(neg_inf), torch.zeros_like(neg_inf)
    mq = torch.full((n_tok,), -torch.inf, device=x.device)
    sq = torch.zeros(n_tok, device=x.device)
    u = torch.zeros_like(neg_inf)
    counts = torch.zeros(n_layers, n_tok, targets.shape[1], dtype=torch.int64, device=x.device)
    z_target = torch.full_like(z_thresh, torch.nan)
    set_sums = torch.zeros(n_layers, n_tok, len(request.token_sets), device=x.device)

    top_values = torch.empty(n_layers, n_tok, 0, device=x.device)
    top_ids = torch.empty(n_layers, n_tok, 0, dtype=torch.int64, device=x.device)

    z_buf = torch.empty(n_layers * n_tok * vocab_chunk, device=x.device)
    e_buf = torch.empty_like(z_buf)
    for v0 in range(0, n_vocab, vocab_chunk):
        v1 = min(n_vocab, v0 + vocab_chunk)
        w = head.unembed[v0:v1].to(operand)  # [Vc, d]; a view in the operand dtype
        b = head.unembed_bias[v0:v1] if head.unembed_bias is not None else None
        n = v1 - v0
        # Logits and exp go into buffers reused across chunks: a fresh tensor of this size costs
        # page faults on every chunk on a CPU. A flat prefix of a buffer is contiguous at any n.
        z = head.postprocess(
            matmul_fp32(x, w, z_buf[: n_layers * n_tok * n].view(n_layers, n_tok, n)), b
        )

        # The chunk's top-k holds its max: no separate pass over z for it.
        values, ids = chunk_topk(z, request.k, v0)
        top_values, top_ids = merge_topk(
            torch.cat([top_values, values], -1), torch.cat([top_ids, ids], -1), request.k
        )

        # One exp per logit; every sum below reuses it. e = exp(z - m) is built in place, and
        # t = sum e (z - m) = <e, z> - m s (the cancellation costs ~1e-7 * |m|: negligible).
        m_new = torch.maximum(m, values.amax(-1))
        alpha = _rescale(s, m, m_new)
        e = torch.sub(z, m_new[..., None], out=e_buf[: z.numel()].view(z.shape)).exp_()
        s_chunk = e.sum(-1)
        shift = torch.where(s > 0, s * (m - m_new), 0.0)
        t = (t + shift) * alpha + _rowdot(e, z) - m_new * s_chunk
        s = s * alpha + s_chunk
        for j, local in enumerate(set_chunks[v0 // vocab_chunk]):
            set_sums[..., j] = set_sums[..., j] * alpha + e[..., local].sum(-1)
        m = m_new
        del e

        if request.kl_final:
            zq = (
                z[-1]
                if final_is_last
                else head.postprocess(matmul_fp32(xq, w, torch.empty(n_tok, n, device=x.device)), b)
            )  # [Tb, Vc]
            mq_new = torch.maximum(mq, zq.amax(-1))
            alpha_q = _rescale(sq, mq, mq_new)
            eq = torch.exp(zq - mq_new[:, None])
            # u = sum eq (zq - z) = <eq, zq> - <eq, z_l> for every layer l
            u = u * alpha_q + _rowdot(eq, zq) - torch.einsum("tv,ltv->lt", eq, z)
            sq = sq * alpha_q + eq.sum(-1)
            mq = mq_new

        for c in range(targets.shape[1]):
            counts[..., c] += _count_greater(z, z_thresh[..., c : c + 1])
            inside = has_target[:, c] & (targets[:, c] >= v0) & (targets[:, c] < v1)
            local = (targets[:, c] - v0).clamp(0, v1 - v0 - 1)
            gathered = z.gather(-1, local.view(1, -1, 1).expand(n_layers, -1, 1))[..., 0]
            z_target[..., c] = torch.where(inside, gathered, z_target[..., c])

    log_s = torch.log(s)
    lse = m + log_s
    out["lse"].copy_(lse)
    out["entropy"].copy_(log_s - t / s)
    if request.kl_final:
        lse_q = mq + torch.log(sq)
        kl = (u / sq + lse - lse_q).clamp_min(0.0)
        if final_is_last:
            kl[-1] = 0.0
        out["kl"].copy_(kl)
    # The target never counts itself, even where its in-chunk logit rounds above the threshold.
    counts -= (z_target > z_thresh).long()
    out["lp"].copy_(torch.where(has_target, z_target - lse[..., None], torch.nan))
    out["rank"].copy_(torch.where(has_target, counts, -1).int())
    out["topk_ids"].copy_(top_ids.int())
    out["topk_lp"].copy_(top_values - lse[..., None])
    if request.token_sets:
        out["sets"].copy_(torch.log(set_sums) - log_s[..., None])
