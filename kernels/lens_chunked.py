"""Chunked-GEMM lens strategy: a vendor GEMM per (row block, vocab chunk), a Triton fold kernel.

Same contract as ``lens_stats_torch`` (definitions in ``codelens.kernels.stats``). Per row block of
``R_b`` rows (all lens layers of ``T_b`` tokens, plus each token's final-layer row when KL needs a
separate reference) and vocabulary chunk ``[v0, v0 + V_c)``:

1. ``buf[:R_b, :V_c] = x_hat @ W_U[v0:v0+V_c]^T`` by ``torch.mm`` (cuBLAS on a GPU), fp32 output
   from the model-dtype operands, into one buffer reused for every step (no ``[rows, V]``).
2. ``_fold_chunk_kernel`` folds that chunk into each row's running statistics, kept in global
   memory between chunks::

       z = post(buf)                  m' = max(m, max z),  a = e^(m - m'),  e = e^(z - m')
       s <- s a + sum e               t <- (t + s (m - m')) a + sum e (z - m')
       g <- g a + sum_{v in S} e      cnt <- cnt + #{v != t : z_v > thr}
       z_q = post(buf[ref])           (the token's final-layer row, same buffer)
       u <- u a_q + sum e_q (z_q - z),  s_q <- s_q a_q + sum e_q   (a_q, e_q as a, e for z_q)
       top-k <- per-row insertion gated at the running k-th value

   then ``lse = m + log s``, ``entropy = log s - t / s``, ``kl = u / s_q + lse - lse_q``.

The norm pre-pass (``norm_stage.stage_rows``) is the fused kernel's, so both strategies see the
same operands. Rows are laid out layer-major inside a block (slot ``l * T_b + j``), so the outputs
are plain views and each row's KL reference is ``ref = (L - 1) * T_b + j`` (the last layer's own
row when ``final_hidden`` is ``hidden[-1]``: its KL is exactly 0) or ``L * T_b + j``.

Costs (kernels/DESIGN.md, "The chunked strategy"): the GEMM runs at the vendor's speed; the fold
reads each fp32 logit once more after the GEMM wrote it (8 bytes per logit, in L2 when the buffer
fits) and the final row's logit once per layer. Large ``k`` (above ``LensChunkedConfig.max_fold_k``)
takes the chunk's top-k with ``torch.topk`` on packed keys instead of the in-kernel insertion, so
any ``k`` the schema allows runs in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from codelens.kernels.head import Head
from codelens.kernels.lens_torch import chunk_topk, matmul_fp32, merge_topk, pack_ids, unpack_keys
from codelens.kernels.norm_stage import (
    KIND_FINAL,
    KIND_HIDDEN,
    NEG_BIG,
    check_kernel_inputs,
    fold_logits,
    insert_round,
    interpreting,
    post_flags,
    postprocess,
    row_argmax,
    set_multiplicities,
    stage_dtype,
    stage_rows,
)
from codelens.kernels.stats import (
    LensRequest,
    LensStats,
    check_inputs,
    empty_outputs,
    final_is_shared,
    float32_matmuls,
    masked_stats,
    target_logprob,
    to_device_async,
)


@dataclass(frozen=True)
class LensChunkedConfig:
    """Block sizes of the chunked strategy.

    Attributes:
        rows_per_gemm: rows per GEMM (rounded down to whole tokens, at least one token).
        vocab_chunk: vocabulary columns per GEMM. With ``rows_per_gemm`` it sizes the fp32
            buffer: 2048 x 4096 x 4 B = 32 MiB, which stays in an H100/H200's 50 MB L2 between
            the GEMM that writes it and the fold that reads it.
        fold_block_r: rows per fold program. 1 on a GPU: each row runs its own top-k insertion,
            so no row waits for the worst row of a block.
        fold_block_v: columns per fold step (a power of two).
        max_fold_k: the largest ``k`` whose top-k the fold kernel keeps; above it the chunk's
            top-k comes from ``torch.topk`` (register state of ``k`` entries per row would spill).
        num_warps: warps per fold program.
    """

    rows_per_gemm: int = 2048
    vocab_chunk: int = 4096
    fold_block_r: int = 1
    fold_block_v: int = 1024
    max_fold_k: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("rows_per_gemm", "vocab_chunk", "fold_block_r", "num_warps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fold_block_r", "fold_block_v"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.max_fold_k < 0:
            raise ValueError(f"max_fold_k must be >= 0, got {self.max_fold_k}")


def default_chunked_config(interpret: bool | None = None) -> LensChunkedConfig:
    """The GPU defaults, or small GEMMs and many rows per fold program under the interpreter
    (its cost is per operation, not per element)."""
    if interpret is None:
        interpret = interpreting()
    if not interpret:
        return LensChunkedConfig()
    return LensChunkedConfig(rows_per_gemm=256, vocab_chunk=256, fold_block_r=32, fold_block_v=256)


@triton.jit(do_not_specialize=["v0", "n_cols", "n_rows"])
def _fold_chunk_kernel(
    z_ptr,  # [R_b, n_cols] fp32 raw products x_hat @ W_U[v0 : v0 + n_cols]^T (row stride n_cols)
    ref_ptr,  # [R_b] int32: the row of z holding each row's KL reference (read with KL)
    b_ptr,  # b_U [V] (read with HAS_BIAS)
    setm_ptr,  # [NS, V] fp32 token-set multiplicities
    tgt_ptr,
    thr_ptr,  # [R_b, CP] int32 target ids (-1 none), fp32 rank thresholds
    st_ptr,  # in/out [6, R_b] fp32: m, s, t, u, m_q, s_q
    cnt_ptr,  # in/out [R_b, CP] int32 counts z > thr over the non-target columns
    g_ptr,  # in/out [R_b, NSP] fp32 set sums (relative to m)
    tv_ptr,
    ti_ptr,  # in/out [R_b, KP] fp32 values, int32 ids of the running top-k (with TOPK)
    n_rows,
    V,
    v0,
    n_cols,
    logit_scale,
    softcap,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    KP: tl.constexpr,
    C: tl.constexpr,
    CP: tl.constexpr,
    NS: tl.constexpr,
    NSP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    KL: tl.constexpr,
    TOPK: tl.constexpr,
):
    """Fold one vocabulary chunk of ``BLOCK_R`` rows into their running statistics.

    Grid ``(cdiv(n_rows, BLOCK_R),)``. The program loads its rows' state, walks the chunk's
    ``n_cols`` columns (global ids ``v0 + c``) in ``BLOCK_V`` steps, and stores the state back;
    the update per step is the module docstring's. The top-k state holds ``KP`` slots, of which
    the first ``k`` start at ``NEG_BIG`` (empty, ids ``-1 - j``) and the rest at ``+inf`` (never
    the minimum, never evicted): the state's minimum is then exactly the running k-th value, and
    a column is a candidate only if it beats it. Each round inserts every row's leftmost largest
    candidate in place of its minimum with the largest id (ties go to the smaller id, and a later
    column never displaces an equal earlier one); with ``BLOCK_R = 1`` the rounds are the row's
    own insertions.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    cidx = tl.arange(0, CP)
    sidx = tl.arange(0, NSP)
    kidx = tl.arange(0, KP)
    plane = n_rows.to(tl.int64)

    m = tl.load(st_ptr + rows, mask=rmask, other=NEG_BIG)
    s = tl.load(st_ptr + plane + rows, mask=rmask, other=0.0)
    t_acc = tl.load(st_ptr + 2 * plane + rows, mask=rmask, other=0.0)
    u = tl.load(st_ptr + 3 * plane + rows, mask=rmask, other=0.0)
    mq = tl.load(st_ptr + 4 * plane + rows, mask=rmask, other=NEG_BIG)
    sq = tl.load(st_ptr + 5 * plane + rows, mask=rmask, other=0.0)
    cmask2 = rmask[:, None] & (cidx[None, :] < CP)
    cnt = tl.load(cnt_ptr + rows[:, None] * CP + cidx[None, :], mask=cmask2, other=0)
    gs = tl.load(g_ptr + rows[:, None] * NSP + sidx[None, :], mask=rmask[:, None], other=0.0)
    if TOPK:
        kmask2 = rmask[:, None] & (kidx[None, :] < KP)
        tv = tl.load(tv_ptr + rows[:, None] * KP + kidx[None, :], mask=kmask2, other=NEG_BIG)
        ti = tl.load(ti_ptr + rows[:, None] * KP + kidx[None, :], mask=kmask2, other=-1)
        tau = tl.min(tv, 1)
    if KL:
        ref = tl.load(ref_ptr + rows, mask=rmask, other=0).to(tl.int64)

    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        cmask = cols < n_cols
        live = rmask[:, None] & cmask[None, :]
        gcol = (v0 + cols).to(tl.int64)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(b_ptr + gcol, mask=cmask, other=0.0).to(tl.float32)[None, :]
        raw = tl.load(z_ptr + rows[:, None] * n_cols + cols[None, :], mask=live, other=0.0)
        z = postprocess(raw, bias, logit_scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(live, z, NEG_BIG)

        m_new, s, t_acc, gs, cnt = fold_logits(
            z, v0 + cols, cmask, rows, rmask, m, s, t_acc, gs, cnt, setm_ptr, tgt_ptr, thr_ptr,
            V, NS, NSP, C, CP, ENTROPY, True,
        )  # fmt: skip

        if KL:
            raw_q = tl.load(z_ptr + ref[:, None] * n_cols + cols[None, :], mask=live, other=0.0)
            zq = postprocess(raw_q, bias, logit_scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
            zq = tl.where(live, zq, NEG_BIG)
            mq_new = tl.maximum(mq, tl.max(zq, 1))
            alpha_q = tl.exp(mq - mq_new)
            eq = tl.exp(zq - mq_new[:, None])
            u = u * alpha_q + tl.sum(eq * (zq - z), 1)
            sq = sq * alpha_q + tl.sum(eq, 1)
            mq = mq_new
        m = m_new

        if TOPK:
            # Rounds are rare here (a row's own insertions, ~0.4 per step): the test is a count,
            # which costs less before the loop than the fused kernel's arg-max form.
            gate = z > tau[:, None]
            zc = tl.where(gate, z, float("-inf"))
            n_cand = tl.sum(gate.to(tl.int32))
            while n_cand > 0:
                mx, ix = row_argmax(zc)
                tv, ti, tau, keep = insert_round(zc, mx, ix, v0 + c0, tv, ti)
                zc = tl.where(keep, zc, float("-inf"))
                n_cand = tl.sum(keep.to(tl.int32))

    tl.store(st_ptr + rows, m, mask=rmask)
    tl.store(st_ptr + plane + rows, s, mask=rmask)
    tl.store(st_ptr + 2 * plane + rows, t_acc, mask=rmask)
    tl.store(st_ptr + 3 * plane + rows, u, mask=rmask)
    tl.store(st_ptr + 4 * plane + rows, mq, mask=rmask)
    tl.store(st_ptr + 5 * plane + rows, sq, mask=rmask)
    tl.store(cnt_ptr + rows[:, None] * CP + cidx[None, :], cnt, mask=cmask2)
    tl.store(g_ptr + rows[:, None] * NSP + sidx[None, :], gs, mask=rmask[:, None])
    if TOPK:
        tl.store(tv_ptr + rows[:, None] * KP + kidx[None, :], tv, mask=kmask2)
        tl.store(ti_ptr + rows[:, None] * KP + kidx[None, :], ti, mask=kmask2)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def lens_stats_chunked(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    request: LensRequest,
    final_hidden: Tensor | None = None,
    *,
    config: LensChunkedConfig | None = None,
    precision: str = "model",
) -> LensStats:
    """Lens statistics from the chunked-GEMM strategy; same contract as ``lens_stats_torch``.

    Args:
        hidden: ``[L, T, d]`` residual rows (fp32, bf16 or fp16), on a CUDA device (or the CPU
            under ``TRITON_INTERPRET=1``).
        head: the model's read-out path, on ``hidden``'s device; ``W_U [V, d]`` fp32/bf16/fp16.
        targets: ``[T, 1 + A]`` int; column 0 the next token, column j the token ``lookahead[j-1]``
            positions ahead; -1 where there is none. On the host or on ``hidden``'s device; on the
            host (as the pipeline passes them) they are checked without waiting for the device
            and copied without blocking.
        request: what to compute.
        final_hidden: ``[T, d]`` the final layer's rows, needed for ``kl_final``; when it is
            ``hidden[-1]`` (same storage) the last layer is the reference and its KL exactly 0.
        config: block sizes; ``default_chunked_config()`` when None.
        precision: ``"model"`` (operands in ``W_U``'s dtype; fp32 ones through TF32 tensor cores)
            or ``"fp32"`` (fp32 operands, IEEE matmuls).

    Returns:
        LensStats on ``hidden``'s device, non-finite rows flagged as in ``lens_stats_torch``.
    """
    check_inputs(hidden, targets, final_hidden, request, head.vocab_size, head.d_model)
    targets = to_device_async(targets, hidden.device)
    w_u = check_kernel_inputs(hidden, head, targets, request, final_hidden, precision)
    interpret = interpreting()
    cfg = config or default_chunked_config(interpret)

    device = hidden.device
    n_layers, n_tokens, _ = hidden.shape
    n_cols = targets.shape[1]
    out = empty_outputs(n_layers, n_tokens, request, n_cols, device)
    finite = torch.ones(n_layers, n_tokens, dtype=torch.bool, device=device)
    if n_layers and n_tokens:
        # fp32 operands in "model" precision: TF32 tensor cores (kernels/DESIGN.md gives the
        # error), switched on once for the whole call rather than around every chunk's GEMM.
        operand_dtype = stage_dtype(w_u, precision)
        tf32 = device.type == "cuda" and operand_dtype == torch.float32 and precision == "model"
        # "fp32" is IEEE even where the process asked torch for TF32 matmuls.
        with float32_matmuls("high" if tf32 else "highest" if precision == "fp32" else None):
            _run_blocks(
                hidden, final_hidden, head, w_u, targets, request, cfg, operand_dtype, out, finite
            )
    return masked_stats(out, finite, request)


def _run_blocks(
    hidden: Tensor,
    final_hidden: Tensor | None,
    head: Head,
    w_u: Tensor,
    targets: Tensor,
    request: LensRequest,
    cfg: LensChunkedConfig,
    operand_dtype: torch.dtype,
    out: dict[str, Tensor],
    finite: Tensor,
) -> None:
    """Every token block: stage, then GEMM + fold per vocabulary chunk, then finish its rows.

    ``operand_dtype`` is what the GEMM multiplies (``stage_dtype``); runs inside the caller's
    matmul-precision setting (``stats.float32_matmuls``).
    """
    device = hidden.device
    n_layers, n_tokens, _ = hidden.shape
    n_vocab = head.vocab_size
    n_cols, n_sets, k = targets.shape[1], len(request.token_sets), request.k
    cp = triton.next_power_of_2(n_cols)
    nsp = triton.next_power_of_2(max(n_sets, 1))
    fold_topk = k <= cfg.max_fold_k
    kp = triton.next_power_of_2(k) if fold_topk else 1
    final_shared = final_is_shared(hidden, final_hidden)
    separate_final = request.kl_final and not final_shared
    rows_per_token = n_layers + int(separate_final)
    token_block = max(1, min(n_tokens, cfg.rows_per_gemm // rows_per_token))
    vocab_chunk = max(1, min(cfg.vocab_chunk, n_vocab))

    set_mask = set_multiplicities(request, n_vocab, device)
    bias = head.unembed_bias
    softcap = head.softcap if head.softcap is not None else 1.0
    dummy = w_u  # never read: the matching constexpr flag prunes the load
    buf = torch.empty(
        token_block * rows_per_token * vocab_chunk, dtype=torch.float32, device=device
    )
    layers = torch.arange(n_layers, device=device)

    for t0 in range(0, n_tokens, token_block):
        nt = min(n_tokens, t0 + token_block) - t0
        tok = torch.arange(t0, t0 + nt, device=device)
        n_rows, n_out = rows_per_token * nt, n_layers * nt
        # Slots: layer-major (l * nt + j), then the separate final rows (n_out + j).
        h_off = (layers[:, None] * hidden.stride(0) + tok[None, :] * hidden.stride(1)).flatten()
        kind = torch.full((n_rows,), KIND_HIDDEN, dtype=torch.int8, device=device)
        slot_tgt = torch.full((n_rows, cp), -1, dtype=torch.int32, device=device)
        slot_tgt[:n_out, :n_cols] = targets[t0 : t0 + nt].int().repeat(n_layers, 1)
        if separate_final:
            src_off = torch.cat([h_off, tok * final_hidden.stride(0)])
            kind[n_out:] = KIND_FINAL
            ref = n_out + torch.arange(nt, device=device)
        else:
            src_off = h_off
            ref = (n_layers - 1) * nt + torch.arange(nt, device=device)
        ref = ref.repeat(rows_per_token).int()
        f_src = final_hidden if separate_final else hidden[-1]
        x_stage, slot_finite, thr = stage_rows(
            hidden, f_src, src_off, kind, slot_tgt, n_cols, head, w_u, operand_dtype, interpreting()
        )

        state = torch.zeros(6, n_rows, dtype=torch.float32, device=device)
        state[0] = state[4] = NEG_BIG.value
        cnt = torch.zeros(n_rows, cp, dtype=torch.int32, device=device)
        gs = torch.zeros(n_rows, nsp, dtype=torch.float32, device=device)
        # Slots >= k start at +inf: never the minimum, so the gate is the exact k-th value.
        slot_j = torch.arange(kp, device=device)
        tv = torch.where(slot_j < k, NEG_BIG.value, torch.inf).expand(n_rows, kp).contiguous()
        ti = (-1 - slot_j).int().expand(n_rows, kp).contiguous()
        top = None  # (values, ids) [n_out, k] when the chunks' top-k runs in torch

        for v0 in range(0, n_vocab, vocab_chunk):
            n = min(n_vocab, v0 + vocab_chunk) - v0
            z = buf[: n_rows * n].view(n_rows, n)
            w = w_u[v0 : v0 + n]
            # precision "fp32" with a 16-bit head: the chunk widened (exact), IEEE products.
            matmul_fp32(x_stage, w if w.dtype == operand_dtype else w.float(), z)
            _fold_chunk_kernel[(triton.cdiv(n_rows, cfg.fold_block_r),)](
                z,
                ref,
                bias if bias is not None else dummy,
                set_mask,
                slot_tgt,
                thr,
                state,
                cnt,
                gs,
                tv,
                ti,
                n_rows,
                n_vocab,
                v0,
                n,
                float(head.logit_scale),
                float(softcap),
                BLOCK_R=cfg.fold_block_r,
                BLOCK_V=min(cfg.fold_block_v, triton.next_power_of_2(n)),
                KP=kp,
                C=n_cols,
                CP=cp,
                NS=n_sets,
                NSP=nsp,
                **post_flags(head),
                ENTROPY=request.entropy,
                KL=request.kl_final,
                TOPK=fold_topk,
                num_warps=cfg.num_warps,
            )
            if not fold_topk:
                b = bias[v0 : v0 + n] if bias is not None else None
                values, ids = chunk_topk(head.postprocess(z[:n_out], b), k, v0, sync_free=True)
                top = (
                    (values, ids)
                    if top is None
                    else merge_topk(
                        torch.cat([top[0], values], -1), torch.cat([top[1], ids], -1), k
                    )
                )

        if not fold_topk:
            top_values, top_ids = top
        else:
            keys = pack_ids(tv[:n_out], ti[:n_out])
            keys = torch.where(ti[:n_out] >= 0, keys, torch.iinfo(torch.int64).min)
            top_values, top_ids = unpack_keys(keys.topk(k, -1).values)
        _finish(
            state, cnt, gs, thr, slot_tgt, slot_finite, top_values, top_ids,
            n_layers, nt, n_cols, request, final_shared,
            {name: t[:, t0 : t0 + nt] for name, t in out.items()}, finite[:, t0 : t0 + nt],
        )  # fmt: skip


def _finish(
    state: Tensor,
    cnt: Tensor,
    gs: Tensor,
    thr: Tensor,
    slot_tgt: Tensor,
    slot_finite: Tensor,
    top_values: Tensor,
    top_ids: Tensor,
    n_layers: int,
    nt: int,
    n_cols: int,
    request: LensRequest,
    final_shared: bool,
    out: dict[str, Tensor],
    finite: Tensor,
) -> None:
    """The statistics of one token block's output rows (the first ``L * nt`` slots) into ``out``
    (views ``[L, nt, ...]``), from the folded state."""
    n_out = n_layers * nt
    m, s, t_acc, u, mq, sq = (plane[:n_out] for plane in state)
    log_s = torch.log(s)
    lse = m + log_s
    grid = (n_layers, nt)
    out["lse"].copy_(lse.view(grid))
    finite.copy_((slot_finite[:n_out] != 0).view(grid))
    if request.entropy:
        out["entropy"].copy_((log_s - t_acc / s).view(grid))
    if request.kl_final:
        lse_q = mq + torch.log(sq)
        kl = (u / sq + lse - lse_q).clamp_min(0.0).view(grid)
        if final_shared:
            kl[-1] = 0.0  # its own reference
        out["kl"].copy_(kl)
    has = slot_tgt[:n_out, :n_cols] >= 0
    counts = cnt[:n_out, :n_cols].long()
    lp = torch.where(has, target_logprob(thr[:n_out, :n_cols], lse[:, None]), torch.nan)
    out["lp"].copy_(lp.view(*grid, n_cols))
    out["rank"].copy_(torch.where(has, counts, -1).int().view(*grid, n_cols))
    n_sets = len(request.token_sets)
    if n_sets:
        out["sets"].copy_((torch.log(gs[:n_out, :n_sets]) - log_s[:, None]).view(*grid, n_sets))
    out["topk_ids"].copy_(top_ids.int().view(*grid, -1))
    out["topk_lp"].copy_((top_values - lse[:, None]).view(*grid, -1))


__all__ = ["LensChunkedConfig", "default_chunked_config", "lens_stats_chunked"]
