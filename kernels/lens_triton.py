"""Fused Triton lens kernel: final norm -> unembedding -> every per-row statistic, no ``[rows, V]``.

Same contract as ``lens_stats_torch`` (see ``codelens.kernels.stats`` for the definitions). Per row
``r`` (a (layer, token) pair) with logits ``z = post(norm(h_r) @ W_U^T + b_U)``:
``lse``, ``entropy``, target/look-ahead log-probs and ranks, ``kl_final = KL(q || p)`` against the
token's final-layer row, top-k (ties to the smaller id) and token-set log-masses.

Three launches: the norm pre-pass (``norm_stage.stage_rows``), the fused matmul + streaming
statistics (``_lens_main_kernel``) and a fixed-order torch merge, so runs are bitwise
deterministic. Why it is built this way (slot layout for KL, the streaming top-k, precision
modes, block sizes): ``kernels/DESIGN.md``. Measured accuracy and sm_90 compile figures:
``benchmarks/results/kernel-*.md``.

This module imports Triton at import time; ``codelens.kernels`` imports it lazily (dispatch), so
importing the package never needs Triton and nothing here touches CUDA before a call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from codelens.kernels.final_mixture import kl_from_mixture, mixture_applies
from codelens.kernels.head import Head
from codelens.kernels.lens_torch import pack_ids, unpack_keys
from codelens.kernels.norm_stage import (
    KIND_FINAL,
    KIND_HIDDEN,
    KIND_PAD,
    NEG_BIG,
    check_kernel_inputs,
    dot_precision,
    fold_logits,
    insert_round,
    interpreting,
    normalized_rows,
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
    masked_stats,
    target_logprob,
    to_device_async,
)


@dataclass(frozen=True)
class LensTritonConfig:
    """Launch parameters of the fused lens kernel (``kernels/DESIGN.md`` explains the defaults).

    Attributes:
        block_m: rows (slots) per program; a power of two >= 16.
        block_n: vocabulary columns per tile; a power of two >= 16.
        block_k: reduction step over d; a power of two >= 16.
        group_m: row blocks per raster group (L2 reuse of W tiles).
        vocab_chunk: vocabulary entries per program (rounded up to whole tiles).
        max_slots: slots per launch; bounds the staging buffer and the partial records.
        num_warps: warps per program of the main kernel.
        num_stages: software-pipelining stages of the main kernel's K loop.
        epilogue_subtiles: column slices (1 or 2) the epilogue folds a tile in, one after the
            other; 2 keeps a ``BLOCK_N = 256`` tile's temporaries to one half at a time.
        kl_by_mixture: compute ``kl_final`` from the final layer's mixture of ``W_U`` rows
            (``final_mixture.py``) where the head allows it, instead of in the kernel's epilogue
            against a final-layer slot in every row block.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 16
    vocab_chunk: int = 4096
    max_slots: int = 32768
    num_warps: int = 8
    num_stages: int = 3
    epilogue_subtiles: int = 1
    kl_by_mixture: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        for name in ("group_m", "vocab_chunk", "max_slots", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epilogue_subtiles not in (1, 2) or self.block_n // self.epilogue_subtiles < 16:
            raise ValueError(
                f"epilogue_subtiles must be 1 or 2 with block_n / epilogue_subtiles >= 16, got "
                f"{self.epilogue_subtiles} with block_n {self.block_n}"
            )


def default_config(d_model: int, interpret: bool | None = None) -> LensTritonConfig:
    """Block sizes for ``d_model``: the GPU defaults, or few large tiles under the interpreter."""
    if interpret is None:
        interpret = interpreting()
    if not interpret:
        return LensTritonConfig()
    return LensTritonConfig(
        block_m=32,
        block_n=256,
        block_k=min(128, max(16, triton.next_power_of_2(d_model))),
        group_m=4,
        vocab_chunk=512,
        max_slots=4096,
    )


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fold_tile(
    acc, v0, rows, b_ptr, setm_ptr, tgt_ptr, thr_ptr, tau_ptr, V, logit_scale, softcap,
    m, s, t_acc, u, cnt, gs, tv, ti, tau_loc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    C: tl.constexpr, CP: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr, LB: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr, KL: tl.constexpr,
):  # fmt: skip
    """Fold one ``[BLOCK_M, BLOCK_N]`` tile of raw products into the running per-row state.

    ``acc`` holds ``x @ W[v0 : v0 + BLOCK_N]^T`` for the program's rows; the update is the one
    in ``_lens_main_kernel``'s docstring. The state (``m, s, t_acc, u [BLOCK_M]``, ``cnt
    [BLOCK_M, CP]``, ``gs [BLOCK_M, NSP]``, ``tv, ti [BLOCK_M, KP]``, ``tau_loc [BLOCK_M]``) goes
    in and comes back updated; the shared k-th-value bound at ``tau_ptr`` is raised in place.
    """
    cols = v0 + tl.arange(0, BLOCK_N)
    cmask = cols < V
    cols64 = cols.to(tl.int64)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
    z = postprocess(acc, bias, logit_scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
    z = tl.where(cmask[None, :], z, NEG_BIG)

    m_new, s, t_acc, gs, cnt = fold_logits(
        z, cols, cmask, rows, None, m, s, t_acc, gs, cnt, setm_ptr, tgt_ptr, thr_ptr, V,
        NS, NSP, C, CP, ENTROPY, False,
    )  # fmt: skip

    if KL:
        # Slot (j, i) = row j * LB + i; slot LB - 1 of token j is its final-layer row.
        TB: tl.constexpr = BLOCK_M // LB
        fsel = tl.arange(0, LB) == LB - 1
        z3 = tl.reshape(z, [TB, LB, BLOCK_N])
        zq = tl.sum(tl.where(fsel[None, :, None], z3, 0.0), 1)  # [TB, BLOCK_N]
        mq_old = tl.sum(tl.where(fsel[None, :], tl.reshape(m, [TB, LB]), 0.0), 1)
        mq_new = tl.sum(tl.where(fsel[None, :], tl.reshape(m_new, [TB, LB]), 0.0), 1)
        eq = tl.exp(zq - mq_new[:, None])  # = the final slot's own e
        du = tl.sum(eq[:, None, :] * (zq[:, None, :] - z3), 2)  # [TB, LB]
        u3 = tl.reshape(u, [TB, LB]) * tl.exp(mq_old - mq_new)[:, None] + du
        u = tl.reshape(u3, [BLOCK_M])
    m = m_new

    # Gated top-k insertion: candidates must beat the local k-th value and reach the shared
    # lower bound; each round inserts every row's leftmost maximum in place of its minimum.
    tau_g = tl.load(tau_ptr + rows)
    # The loop test is the next round's arg-max (128 row values, not the tile): sm_90 compiles
    # this form to 574 instructions a round and no spills, a count of the candidates to 708 and
    # 34 spills (kernel_sm90.json).
    zc = tl.where((z > tau_loc[:, None]) & (z >= tau_g[:, None]), z, float("-inf"))
    mx, ix = row_argmax(zc)
    while tl.max(mx) > NEG_BIG:
        tv, ti, tau_loc, keep = insert_round(zc, mx, ix, v0, tv, ti)
        zc = tl.where(keep, zc, float("-inf"))
        mx, ix = row_argmax(zc)
    # A full local state's minimum is a lower bound of the row's global k-th value.
    tl.atomic_max(tau_ptr + rows, tau_loc, mask=tau_loc > tau_g)

    return m, s, t_acc, u, cnt, gs, tv, ti, tau_loc


@triton.jit(do_not_specialize=["n_chunks"])
def _lens_main_kernel(
    x_ptr,  # [R_pad, D] staged normalised rows (operand dtype), slot order
    w_ptr,
    stride_wv,  # W_U [V, D], row stride (unit stride along D)
    b_ptr,  # b_U [V] (read only with HAS_BIAS)
    setm_ptr,  # [NS, V] fp32 token-set multiplicities (an id listed twice counts twice)
    tgt_ptr,
    thr_ptr,  # [R_pad, CP] int32 target ids, fp32 rank thresholds
    tau_ptr,  # [R_pad] fp32 shared lower bound of each row's k-th largest logit
    pf_ptr,  # out [4, S, R_pad] fp32: m, s, t, u per (row, chunk)
    pcnt_ptr,  # out [S, R_pad, CP] int32 counts z > z~ over the non-target columns
    pset_ptr,  # out [S, R_pad, NSP] fp32 set sums (relative to the chunk's m)
    ptv_ptr,
    pti_ptr,  # out [S, R_pad, KP] fp32 values, int32 ids of the chunk's top-KP
    R_pad,
    V,
    D,
    n_chunks,
    chunk_tiles,
    n_row_blocks,
    logit_scale,
    softcap,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    C: tl.constexpr,
    CP: tl.constexpr,
    NS: tl.constexpr,
    NSP: tl.constexpr,
    LB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    KL: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SUBTILES: tl.constexpr,
):
    """One (row block, vocabulary chunk): streaming statistics over the chunk's tiles.

    Program ``pid`` owns ``BLOCK_M`` slots (rows) and ``chunk_tiles * BLOCK_N`` vocabulary
    columns. Per ``[BLOCK_M, BLOCK_N]`` tile: ``z = post(x @ W^T)`` (fp32 accumulator over
    ``BLOCK_K`` steps of ``D``; ``post`` adds ``b``, multiplies by ``logit_scale``, soft-caps), then
    with ``m' = max(m, max z)``, ``alpha = e^(m - m')`` and one ``e = e^(z - m')`` per logit::

        s   <- s * alpha + sum e                    (lse = m + log s)
        t   <- (t + s (m - m')) * alpha + sum e (z - m')   (entropy = log s - t / s)
        u   <- u * alpha_q + sum e_q (z_q - z)      (kl = u / s_q + lse - lse_q; z_q: final slot)
        cnt <- cnt + #{v != t : z_v > thr}          (ranks; logprob = thr - lse)
        g   <- g * alpha + sum_{v in S} e           (token-set masses)
        top-k values/ids <- gated insertion of z (ties to the smaller id; KP slots, K live)

    Args (shapes; S = n_chunks, R_pad = padded slots, CP = padded targets, KP = padded k):
        x_ptr, w_ptr, stride_wv, b_ptr: the staged rows ``[R_pad, D]``, ``W_U [V, D]`` (row stride
            ``stride_wv``) and ``b_U [V]``.
        setm_ptr, tgt_ptr, thr_ptr, tau_ptr: set multiplicities ``[NS, V]``, target ids and rank
            thresholds ``[R_pad, CP]``, the shared per-row k-th-value bound ``[R_pad]``.
        pf_ptr, pcnt_ptr, pset_ptr, ptv_ptr, pti_ptr: the outputs per (row, chunk):
            ``m, s, t, u [4, S, R_pad]``, target logits and counts ``[S, R_pad, CP]``, set sums
            ``[S, R_pad, NSP]``, top-KP values and ids ``[S, R_pad, KP]``.
        R_pad, V, D, n_chunks, chunk_tiles, n_row_blocks: sizes and the grid's shape.
        logit_scale, softcap: the head's post-processing constants.
        BLOCK_* / GROUP_M / LB: tiling, raster group and layer slots per token (DESIGN.md).
        K, KP, C, CP, NS, NSP: k and its padding, targets (1 + look-ahead), token sets.
        HAS_* / ENTROPY / KL / UPCAST / EVEN_K / DOT_PRECISION: compile-time switches.
        SUBTILES: column slices the epilogue (``_fold_tile``) folds each tile in.
    """
    # Grouped raster: GROUP_M row blocks x all chunks per group, row block fastest, so programs
    # running at the same time walk the same W tiles (and reuse each A block across chunks).
    pid = tl.program_id(0)
    per_group = GROUP_M * n_chunks
    group = pid // per_group
    first_rb = group * GROUP_M
    gsize = tl.minimum(n_row_blocks - first_rb, GROUP_M)
    local = pid - group * per_group
    rb = first_rb + local % gsize
    ch = local // gsize

    rows = rb.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    cidx = tl.arange(0, CP)
    sidx = tl.arange(0, NSP)
    tile0 = ch * chunk_tiles
    n_it = tl.minimum(chunk_tiles, tl.cdiv(V, BLOCK_N) - tile0)

    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t_acc = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    cnt = tl.zeros([BLOCK_M, CP], tl.int32)
    gs = tl.zeros([BLOCK_M, NSP], tl.float32)
    # Slots >= K start at +inf: never the minimum, so the gate below is the exact running k-th
    # value (not the KP-th) and no insertion round is spent on the padding slots.
    tv = tl.where(tl.arange(0, KP)[None, :] < K, NEG_BIG, float("inf")) + tl.zeros(
        [BLOCK_M, KP], tl.float32
    )
    # Distinct negative ids for empty slots keep "the minimum with the largest id" unique.
    ti = tl.zeros([BLOCK_M, KP], tl.int32) + (-1 - tl.arange(0, KP))[None, :]
    tau_loc = tl.full([BLOCK_M], NEG_BIG, tl.float32)

    for it in range(0, n_it):
        v0 = (tile0 + it) * BLOCK_N
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < V
        cols64 = cols.to(tl.int64)

        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptr + rows[:, None] * D + (k0 + kk)[None, :])
                w = tl.load(
                    w_ptr + cols64[:, None] * stride_wv + (k0 + kk)[None, :],
                    mask=cmask[:, None],
                    other=0.0,
                )
            else:
                kmask = (k0 + kk) < D
                a = tl.load(
                    x_ptr + rows[:, None] * D + (k0 + kk)[None, :], mask=kmask[None, :], other=0.0
                )
                w = tl.load(
                    w_ptr + cols64[:, None] * stride_wv + (k0 + kk)[None, :],
                    mask=cmask[:, None] & kmask[None, :],
                    other=0.0,
                )
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)

        # Epilogue sub-tiles: the accumulator is folded in SUBTILES column slices, one after the
        # other, so only one slice's temporaries are live at a time (kernels/DESIGN.md).
        SUB_N: tl.constexpr = BLOCK_N // SUBTILES
        if SUBTILES == 2:
            lo, hi = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, SUB_N]), [0, 2, 1]))
        for h in tl.static_range(SUBTILES):
            if SUBTILES == 2:
                part = lo if h == 0 else hi
            else:
                part = acc
            m, s, t_acc, u, cnt, gs, tv, ti, tau_loc = _fold_tile(
                part, v0 + h * SUB_N, rows, b_ptr, setm_ptr, tgt_ptr, thr_ptr, tau_ptr, V,
                logit_scale, softcap, m, s, t_acc, u, cnt, gs, tv, ti, tau_loc,
                BLOCK_M, SUB_N, K, KP, C, CP, NS, NSP, LB,
                HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, ENTROPY, KL,
            )  # fmt: skip

    base = ch.to(tl.int64) * R_pad + rows
    plane = n_chunks.to(tl.int64) * R_pad
    tl.store(pf_ptr + base, m)
    tl.store(pf_ptr + plane + base, s)
    tl.store(pf_ptr + 2 * plane + base, t_acc)
    tl.store(pf_ptr + 3 * plane + base, u)
    tl.store(pcnt_ptr + base[:, None] * CP + cidx[None, :], cnt)
    tl.store(pset_ptr + base[:, None] * NSP + sidx[None, :], gs)
    kidx = tl.arange(0, KP)
    tl.store(ptv_ptr + base[:, None] * KP + kidx[None, :], tv)
    tl.store(pti_ptr + base[:, None] * KP + kidx[None, :], ti)


# --------------------------------------------------------------------------------------------------
# Host side: slot layout, launches, merge
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """How (layer, token) rows map to slots.

    A row block is ``tb`` tokens x ``lb`` layer slots (layer slot fastest); ``groups`` row blocks
    per token block cover the non-final layers ``nonfinal``, ``per_group`` of them per block. With
    ``kl`` the last layer slot of each token is its final-layer row (``final_shared``: the row
    ``hidden[-1]``, else ``final_hidden``).
    """

    lb: int
    tb: int
    groups: int
    per_group: int
    nonfinal: tuple[int, ...]
    kl: bool
    final_shared: bool


def _plan_layout(n_layers: int, block_m: int, kl: bool, final_shared: bool) -> _Layout:
    """Choose ``lb`` (layer slots per token and row block) minimising slots per token."""
    if not kl:
        return _Layout(1, block_m, n_layers, 1, tuple(range(n_layers)), False, False)
    nonfinal = tuple(range(n_layers - 1 if final_shared else n_layers))
    if not nonfinal:
        return _Layout(1, block_m, 1, 0, nonfinal, True, final_shared)
    best = None
    lb = 2
    while lb <= block_m:
        groups = -(-len(nonfinal) // (lb - 1))
        if best is None or groups * lb < best[0]:
            best = (groups * lb, lb, groups)
        lb *= 2
    _, lb, groups = best
    return _Layout(lb, block_m // lb, groups, lb - 1, nonfinal, True, final_shared)


def lens_stats_triton(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    request: LensRequest,
    final_hidden: Tensor | None = None,
    *,
    config: LensTritonConfig | None = None,
    precision: str = "model",
) -> LensStats:
    """Lens statistics from the fused Triton kernel; same contract as ``lens_stats_torch``.

    Args:
        hidden: ``[L, T, d]`` residual rows (fp32, bf16 or fp16), on a CUDA device (or the CPU
            under ``TRITON_INTERPRET=1``).
        head: the model's read-out path, on ``hidden``'s device; ``W_U [V, d]`` fp32/bf16/fp16.
        targets: ``[T, 1 + A]`` int; column 0 the next token, column j the token ``lookahead[j-1]``
            positions ahead; -1 where there is none. On the host or on ``hidden``'s device; on the
            host (as the pipeline passes them) they are checked without waiting for the device
            and copied without blocking.
        request: what to compute.
        final_hidden: ``[T, d]`` the final layer's rows, needed for ``kl_final``. When it is the
            same storage as ``hidden[-1]`` the last layer serves as the reference and its
            ``kl_final`` is exactly 0.
        config: block sizes and launch limits; ``default_config(d)`` when None.
        precision: ``"model"`` (operands in ``W_U``'s dtype: tensor cores) or ``"fp32"``.

    Returns:
        LensStats on ``hidden``'s device (fp32 / int32 / bool), non-finite rows flagged with NaN
        statistics and -1 ranks and ids.
    """
    check_inputs(hidden, targets, final_hidden, request, head.vocab_size, head.d_model)
    targets = to_device_async(targets, hidden.device)
    w_u = check_kernel_inputs(hidden, head, targets, request, final_hidden, precision)
    interpret = interpreting()
    cfg = config or default_config(head.d_model, interpret)

    device = hidden.device
    n_layers, n_tokens, _ = hidden.shape
    n_cols = targets.shape[1]
    outs = empty_outputs(n_layers, n_tokens, request, n_cols, device)
    finite = torch.ones(n_layers, n_tokens, dtype=torch.bool, device=device)

    if n_layers and n_tokens:
        final_shared = final_is_shared(hidden, final_hidden)
        # KL from the final layer's mixture where the head allows it: the kernel then runs
        # without KL (no final slot per row block, no per-logit KL work; final_mixture.py).
        tf32 = device.type == "cuda" and precision == "model"
        by_mixture = (
            request.kl_final
            and cfg.kl_by_mixture
            and mixture_applies(head, stage_dtype(w_u, precision), tf32)
        )
        kernel_request = replace(request, kl_final=False) if by_mixture else request
        layout = _plan_layout(n_layers, cfg.block_m, kernel_request.kl_final, final_shared)
        set_mask = set_multiplicities(request, head.vocab_size, device)
        slots_per_token = layout.groups * layout.lb
        tokens_per_launch = max(1, cfg.max_slots // slots_per_token) // layout.tb * layout.tb
        tokens_per_launch = max(layout.tb, tokens_per_launch)
        outs["finite"] = finite
        for t0 in range(0, n_tokens, tokens_per_launch):
            t1 = min(n_tokens, t0 + tokens_per_launch)
            _launch(
                hidden,
                final_hidden,
                head,
                w_u,
                targets,
                kernel_request,
                layout,
                cfg,
                set_mask,
                t0,
                t1,
                precision,
                interpret,
                outs,
            )
        if by_mixture:
            outs["kl"].copy_(
                kl_from_mixture(
                    hidden,
                    final_hidden,
                    head,
                    outs["lse"],
                    precision,
                    final_shared=final_shared,
                    split=device.type == "cuda" and w_u.dtype == torch.bfloat16,
                )
            )

    return masked_stats(outs, finite, request)


def _slot_maps(
    layout: _Layout, n_layers: int, t0: int, t1: int, block_m: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-slot source (layer, token, kind) and per-output-row slot indices for tokens [t0, t1).

    Returns:
        ``slot_layer [R_pad]`` (-1 for a final slot), ``slot_token [R_pad]`` (absolute, -1 for
        padding), ``slot_kind [R_pad]`` int8, ``out_slot [L, n]`` (slot of each output row) and
        ``final_slot [L, n]`` (slot of the row's final-layer reference; unused without KL).
    """
    lb, tb, groups, per_group = layout.lb, layout.tb, layout.groups, layout.per_group
    n = t1 - t0
    n_tblk = -(-n // tb)
    n_blocks = n_tblk * groups
    idx = torch.arange(n_blocks * block_m, device=device)
    blk, r = idx // block_m, idx % block_m
    tblk, g = blk // groups, blk % groups
    j, i = r // lb, r % lb
    local_tok = tblk * tb + j
    tok_ok = local_tok < n
    nonfinal = to_device_async(torch.tensor(layout.nonfinal + (-1,), dtype=torch.long), device)
    pos = g * per_group + i
    if layout.kl:
        is_final = i == lb - 1
        layer_ok = ~is_final & (pos < len(layout.nonfinal))
    else:
        is_final = torch.zeros_like(tok_ok)
        layer_ok = pos < len(layout.nonfinal)
    layer = torch.where(layer_ok, nonfinal[pos.clamp(max=len(layout.nonfinal))], -1)
    if layout.kl and layout.final_shared:
        layer = torch.where(is_final, n_layers - 1, layer)
        kind = torch.where(is_final | layer_ok, KIND_HIDDEN, KIND_PAD)
    else:
        kind = torch.where(layer_ok, KIND_HIDDEN, torch.where(is_final, KIND_FINAL, KIND_PAD))
    kind = torch.where(tok_ok, kind, KIND_PAD).to(torch.int8)
    token = torch.where(tok_ok, t0 + local_tok, -1)

    # Output rows: non-final layer at list position p -> group p // per_group, slot p % per_group;
    # the shared final layer -> the final slot of group 0.
    out_slot = torch.empty(n_layers, n, dtype=torch.long, device=device)
    final_slot = torch.zeros(n_layers, n, dtype=torch.long, device=device)
    loc = torch.arange(n, device=device)
    tok_base = (loc // tb) * groups
    j_loc = loc % tb
    for p, layer_id in enumerate(layout.nonfinal):
        g_p, i_p = divmod(p, per_group)
        block_start = ((tok_base + g_p) * tb + j_loc) * lb
        out_slot[layer_id] = block_start + i_p
        final_slot[layer_id] = block_start + lb - 1
    if layout.kl and layout.final_shared:
        block_start = (tok_base * tb + j_loc) * lb
        out_slot[n_layers - 1] = block_start + lb - 1
        final_slot[n_layers - 1] = block_start + lb - 1
    return layer, token, kind, out_slot, final_slot


def _launch(
    hidden: Tensor,
    final_hidden: Tensor | None,
    head: Head,
    w_u: Tensor,
    targets: Tensor,
    request: LensRequest,
    layout: _Layout,
    cfg: LensTritonConfig,
    set_mask: Tensor,
    t0: int,
    t1: int,
    precision: str,
    interpret: bool,
    outs: dict[str, Tensor],
) -> None:
    """Pre-pass, main kernel and merge for the tokens ``[t0, t1)`` (all layers)."""
    device = hidden.device
    n_layers, _, d = hidden.shape
    n_vocab = head.vocab_size
    n_cols, n_sets, k = targets.shape[1], len(request.token_sets), request.k
    cp = triton.next_power_of_2(n_cols)
    nsp = triton.next_power_of_2(max(n_sets, 1))
    kp = triton.next_power_of_2(k)
    bm, bn = cfg.block_m, cfg.block_n

    layer, token, kind, out_slot, final_slot = _slot_maps(layout, n_layers, t0, t1, bm, device)
    r_pad = kind.shape[0]
    n_row_blocks = r_pad // bm

    # Element offsets of each slot's source row (int64: L * T * d can exceed 2^31).
    tok0 = token.clamp_min(0)
    h_off = layer.clamp_min(0) * hidden.stride(0) + tok0 * hidden.stride(1)
    f_src = final_hidden if final_hidden is not None else hidden[-1]
    f_off = tok0 * f_src.stride(0)
    src_off = torch.where(kind == KIND_FINAL, f_off, h_off).to(torch.int64)
    slot_tgt = torch.full((r_pad, cp), -1, dtype=torch.int32, device=device)
    slot_tgt[:, :n_cols] = torch.where((kind != KIND_PAD)[:, None], targets[tok0].int(), -1)

    operand_dtype = stage_dtype(w_u, precision)
    x_stage, slot_finite, thr = stage_rows(
        hidden, f_src, src_off, kind, slot_tgt, n_cols, head, w_u, operand_dtype, interpret
    )
    bias = head.unembed_bias
    softcap = head.softcap if head.softcap is not None else 1.0
    flags = post_flags(head)
    dummy = w_u  # never read: the matching constexpr flag prunes the load

    n_tiles = triton.cdiv(n_vocab, bn)
    chunk_tiles = max(1, min(n_tiles, triton.cdiv(cfg.vocab_chunk, bn)))
    n_chunks = triton.cdiv(n_tiles, chunk_tiles)
    pf = torch.empty(4, n_chunks, r_pad, dtype=torch.float32, device=device)
    pcnt = torch.empty(n_chunks, r_pad, cp, dtype=torch.int32, device=device)
    pset = torch.empty(n_chunks, r_pad, nsp, dtype=torch.float32, device=device)
    ptv = torch.empty(n_chunks, r_pad, kp, dtype=torch.float32, device=device)
    pti = torch.empty(n_chunks, r_pad, kp, dtype=torch.int32, device=device)
    tau = torch.full((r_pad,), NEG_BIG.value, dtype=torch.float32, device=device)
    upcast = interpret or operand_dtype == torch.float32 or w_u.dtype != operand_dtype
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(d)))
    _lens_main_kernel[(n_row_blocks * n_chunks,)](
        x_stage,
        w_u,
        w_u.stride(0),
        bias if bias is not None else dummy,
        set_mask,
        slot_tgt,
        thr,
        tau,
        pf,
        pcnt,
        pset,
        ptv,
        pti,
        r_pad,
        n_vocab,
        d,
        n_chunks,
        chunk_tiles,
        n_row_blocks,
        float(head.logit_scale),
        float(softcap),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=block_k,
        GROUP_M=cfg.group_m,
        K=k,
        KP=kp,
        C=n_cols,
        CP=cp,
        NS=n_sets,
        NSP=nsp,
        LB=layout.lb,
        **flags,
        ENTROPY=request.entropy,
        KL=layout.kl,
        UPCAST=upcast,
        EVEN_K=d % block_k == 0,
        DOT_PRECISION=dot_precision(upcast or operand_dtype == torch.float32, precision),
        SUBTILES=cfg.epilogue_subtiles,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    # ---- merge over chunks (fixed order), evaluated at the output rows' slots ------------------
    sl = out_slot.reshape(-1)
    pm, ps, pt, pu = pf.unbind(0)  # [S, R_pad] each
    big_m = pm.max(0).values  # [R_pad]
    wgt = torch.exp(pm - big_m)  # [S, R_pad]
    s = (ps * wgt).sum(0)
    log_s = torch.log(s)
    lse = big_m + log_s
    shape = out_slot.shape
    block = slice(t0, t1)
    outs["lse"][:, block] = lse[sl].view(shape)
    outs["finite"][:, block] = (slot_finite[sl] != 0).view(shape)
    if request.entropy:
        t_sum = (wgt * (pt + ps * (pm - big_m))).sum(0)
        outs["entropy"][:, block] = (log_s - t_sum / s)[sl].view(shape)
    if request.kl_final:
        fl = final_slot.reshape(-1)
        u = (pu[:, sl] * torch.exp(pm[:, fl] - big_m[fl])).sum(0)
        kl = (u / s[fl] + lse[sl] - lse[fl]).clamp_min(0.0)
        outs["kl"][:, block] = kl.view(shape)

    tgt = slot_tgt[sl, :n_cols].long()  # [N, C]
    has = tgt >= 0
    counts = pcnt[:, sl, :n_cols].sum(0, dtype=torch.int64)
    lp = torch.where(has, target_logprob(thr[sl, :n_cols], lse[sl, None]), torch.nan)
    outs["lp"][:, block] = lp.view(*shape, n_cols)
    outs["rank"][:, block] = torch.where(has, counts, -1).int().view(*shape, n_cols)

    if n_sets:
        g = (pset[:, sl, :n_sets] * wgt[:, sl, None]).sum(0)
        outs["sets"][:, block] = (torch.log(g) - log_s[sl, None]).view(*shape, n_sets)

    ids = pti[:, sl].permute(1, 0, 2).reshape(sl.numel(), -1)  # [N, S * KP]
    keys = pack_ids(ptv[:, sl].permute(1, 0, 2).reshape(sl.numel(), -1), ids)
    # Empty state entries (negative ids) must never be chosen: the union holds >= k real ones.
    keys = torch.where(ids >= 0, keys, torch.iinfo(torch.int64).min)
    values, top_ids = unpack_keys(keys.topk(k, -1).values)
    outs["topk_ids"][:, block] = top_ids.int().view(*shape, k)
    outs["topk_lp"][:, block] = (values - lse[sl, None]).view(*shape, k)


__all__ = [
    "LensTritonConfig",
    "default_config",
    "interpreting",
    "lens_stats_triton",
    "normalized_rows",
]
