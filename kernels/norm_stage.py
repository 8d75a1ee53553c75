"""Norm pre-pass shared by the Triton lens strategies: final norm, operand staging, rank thresholds.

Both strategies (``lens_triton``: fused GEMM + statistics; ``lens_chunked``: cuBLAS GEMM + a fold
kernel) read the residual rows through this one launch: per slot (a (layer, token) row or a
token's final-layer row) it normalises the row in fp32, rounds it to the MMA operand dtype and
computes the logit each target must be beaten by (the rank threshold). ``postprocess`` is the
head's bias / scale / soft-cap as a Triton function, used by every kernel that makes logits;
``fold_logits`` (online softmax, set masses, target counts) and ``insert_round`` (one round of
the streaming top-k) are the per-logit updates both strategies' epilogues share, so the two
compute every statistic with the same code.

This module imports Triton at import time; ``codelens.kernels`` imports it lazily (dispatch), so
importing the package never needs Triton and nothing here touches CUDA before a call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from codelens.kernels.head import Head, NormKind
from codelens.kernels.stats import PRECISIONS, check_precision, to_device_async

# Sentinel for "no value": below every real logit, above -inf so that exp(NEG_BIG - m) = 0 and
# 0 * (NEG_BIG - m) = 0 (no 0 * inf NaNs for padded vocabulary columns or empty state).
NEG_BIG = tl.constexpr(-1.0e30)
KIND_PAD, KIND_HIDDEN, KIND_FINAL = 0, 1, 2


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def postprocess(
    z,
    bias,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """``post(z) = c * tanh(scale * (z + b) / c)``, the terms switched by the constexpr flags.

    ``z``: a logit tile (any shape, fp32); ``bias``: ``b_U`` broadcast to it; ``logit_scale``
    (``Head.logit_scale``, Granite: ``1 / logits_scaling``) and ``softcap`` (Gemma-2's ``c``):
    scalars, read only when their flag is set.
    """
    if HAS_BIAS:
        z = z + bias
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        # tanh(|y|) = (1 - e) / (1 + e), e = exp(-2|y|) in (0, 1]: no overflow for any y.
        y = z / softcap
        e = tl.exp(-2.0 * tl.abs(y))
        th = (1.0 - e) / (1.0 + e)
        z = tl.where(y < 0, -th, th) * softcap
    return z


@triton.jit
def fold_logits(
    z, cols, cmask, rows, rmask, m, s, t_acc, gs, cnt, setm_ptr, tgt_ptr, thr_ptr, V,
    NS: tl.constexpr, NSP: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
    ENTROPY: tl.constexpr, ROW_MASK: tl.constexpr,
):  # fmt: skip
    """Fold a ``[R, N]`` block of post-processed logits into the rows' running statistics.

    The update both Triton strategies share. ``z``: the block, of global ids ``cols [N]``, valid
    where ``cmask`` (masked logits are ``NEG_BIG``); ``rows [R]``: valid where ``rmask``, read
    only with ``ROW_MASK``. With ``m' = max(m, max z)``, ``alpha = e^(m - m')`` and one
    ``e = e^(z - m')`` per logit::

        s   <- s alpha + sum e                       (lse = m' + log s)
        t   <- (t + s (m - m')) alpha + sum e (z - m')   (entropy = log s - t / s)
        g   <- g alpha + sum_{v in S_j} e            (gs [R, NSP]; setm_ptr: [NS, V] multiplicities)
        cnt <- cnt + #{v != t_c : z_v > thr_c}      (cnt [R, CP]; targets, thresholds [R_pad, CP])

    ``m`` starts at ``NEG_BIG`` (finite), so ``alpha = 0`` on the first block and
    ``s (m - m') = 0`` without a guard. Returns ``m', s, t, gs, cnt``.
    """
    m_new = tl.maximum(m, tl.max(z, 1))
    alpha = tl.exp(m - m_new)
    dz = z - m_new[:, None]
    e = tl.exp(dz)
    if ENTROPY:
        t_acc = (t_acc + s * (m - m_new)) * alpha + tl.sum(e * dz, 1)
    s = s * alpha + tl.sum(e, 1)

    if NS > 0:
        sidx = tl.arange(0, NSP)
        cols64 = cols.to(tl.int64)
        gs = gs * alpha[:, None]
        for j in tl.static_range(NS):
            mult = tl.load(setm_ptr + j * V + cols64, mask=cmask, other=0.0)
            g_j = tl.sum(e * mult[None, :], 1)
            gs += tl.where(sidx[None, :] == j, g_j[:, None], 0.0)

    cidx = tl.arange(0, CP)
    for c in tl.static_range(C):
        if ROW_MASK:
            tc = tl.load(tgt_ptr + rows * CP + c, mask=rmask, other=-1)
            thc = tl.load(thr_ptr + rows * CP + c, mask=rmask, other=float("inf"))
        else:
            tc = tl.load(tgt_ptr + rows * CP + c)
            thc = tl.load(thr_ptr + rows * CP + c)
        # One reduction per target: its own column never counts (the tile's logit may round
        # above the pre-pass threshold); its log-prob is the threshold's.
        others = cols[None, :] != tc[:, None]
        gt_c = tl.sum(((z > thc[:, None]) & others).to(tl.int32), 1)
        cnt += tl.where(cidx[None, :] == c, gt_c[:, None], 0)
    return m_new, s, t_acc, gs, cnt


@triton.jit
def row_argmax(zc):
    """Each row's largest value of ``zc [R, N]`` and its leftmost column (``-inf`` and some
    column for a row of ``-inf``): the next insertion of ``insert_round``."""
    return tl.max(zc, 1, return_indices=True, return_indices_tie_break_left=True)


@triton.jit
def insert_round(zc, mx, ix, base, tv, ti):
    """One round of the streaming top-k insertion both Triton strategies run.

    ``zc [R, N]``: the logits of ids ``base + arange(N)`` still to insert, ``-inf`` elsewhere (a
    float mask: a boolean tile would be packed into bits, two or three bit operations per element
    and round); ``mx, ix [R]``: its ``row_argmax``; ``tv, ti [R, KP]``: each row's top-k state
    (values, ids), whose minimum is the running k-th value. Every row with a candidate puts its
    leftmost largest one in place of its minimum with the largest id (ties go to the smaller id,
    and a later column never displaces an equal earlier one). Returns the state, its new minimum
    ``tau [R]`` and ``keep [R, N]``, the candidates left: not the inserted column, and above the
    new minimum (the caller masks ``zc`` with it and takes its loop test from it or from the
    next ``row_argmax``, whichever its kernel compiles to less).
    """
    at_min = tv == tl.min(tv, 1)[:, None]
    evict = tl.max(tl.where(at_min, ti, -2147483647), 1)
    slot = at_min & (ti == evict[:, None]) & (mx > NEG_BIG)[:, None]
    tv = tl.where(slot, mx[:, None], tv)
    ti = tl.where(slot, (base + ix)[:, None], ti)
    tau = tl.min(tv, 1)
    keep = (tl.arange(0, zc.shape[1])[None, :] != ix[:, None]) & (zc > tau[:, None])
    return tv, ti, tau, keep


@triton.jit
def _norm_stage_kernel(
    h_ptr,
    f_ptr,  # hidden [L, T, d] and final_hidden [T, d] (any float dtype, any strides)
    src_off_ptr,  # [R_pad] int64 element offset of each slot's row in its source
    src_kind_ptr,  # [R_pad] int8: 0 padding, 1 row of hidden, 2 row of final_hidden
    h_stride_d,
    f_stride_d,
    nw_ptr,
    nb_ptr,
    w_offset,
    eps,  # norm weight [d], norm bias [d], weight offset, epsilon
    x_ptr,  # out [R_pad, d] normalised rows in the operand dtype
    finite_ptr,  # out [R_pad] int8: 1 where the source row is all finite
    tgt_ptr,  # [R_pad, CP] int32 target ids per slot (-1 none)
    thr_ptr,  # out [R_pad, CP] fp32 rank thresholds z~ (+inf without a target)
    w_ptr,
    stride_wv,
    b_ptr,
    logit_scale,
    softcap,  # W_U [V, d], b_U [V], post-processing
    R_pad,
    D,
    C: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_LAYER: tl.constexpr,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Norm + staging + rank thresholds for ``BLOCK_R`` slots (one ``[BLOCK_R, d]`` tile).

    ``x_hat = (x - mean) / sqrt(var + eps) * (w + offset) + b`` (LayerNorm) or
    ``x / sqrt(mean(x^2) + eps) * (w + offset)`` (RMSNorm), fp32, then rounded to the operand
    dtype; ``z~[r, c] = post(x_hat_r . W_U[t_rc] + b_U[t_rc])`` from the rounded row, the logit
    a vocabulary entry must beat to rank above target ``c`` of slot ``r``.

    Grid: ``(R_pad / BLOCK_R,)``; each program loads its slots' rows from ``hidden`` or
    ``final_hidden`` (the slot map says which), so the ``[R_pad, d]`` operand of the main kernel
    is written once and the final layer's rows sit beside the rows they are compared with.

    Arguments, by group:
        sources: ``h_ptr [L, T, d]``, ``f_ptr [T, d]``, per-slot ``src_off``/``src_kind``, strides.
        norm: weight ``[d]``, bias ``[d]``, weight offset (Gemma's ``1 + w``), ``eps``.
        outputs: ``x_ptr [R_pad, d]`` (operand dtype), ``finite_ptr [R_pad]`` int8.
        targets: ``tgt_ptr [R_pad, CP]`` int32 ids (-1 none) -> ``thr_ptr [R_pad, CP]`` fp32.
        head: ``W_U [V, d]`` (row stride), ``b_U [V]``, logit scale, soft-cap.
        sizes and switches: ``R_pad``, ``D``; constexpr ``C`` targets (``CP`` padded), block
            sizes, ``IS_LAYER`` (LayerNorm vs RMSNorm) and the ``HAS_*`` flags.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R_pad
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    kind = tl.load(src_kind_ptr + rows, mask=rmask, other=0)
    off = tl.load(src_off_ptr + rows, mask=rmask, other=0)
    from_h = (kind == 1)[:, None] & dmask[None, :]
    from_f = (kind == 2)[:, None] & dmask[None, :]
    # Exactly one of the two loads is live per row; the other contributes an exact 0.
    x = tl.load(
        h_ptr + off[:, None] + cols[None, :].to(tl.int64) * h_stride_d, mask=from_h, other=0.0
    ).to(tl.float32)
    x += tl.load(
        f_ptr + off[:, None] + cols[None, :].to(tl.int64) * f_stride_d, mask=from_f, other=0.0
    ).to(tl.float32)
    ok = tl.abs(x) <= 3.4028234663852886e38  # False for inf and NaN
    finite = tl.sum(tl.where(ok, 0, 1), 1) == 0
    x = tl.where(finite[:, None], x, 0.0)

    if IS_LAYER:
        mean = tl.sum(x, 1) / D
        x = tl.where(dmask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    x = x * rstd[:, None]
    if HAS_NW:
        x = x * (tl.load(nw_ptr + cols, mask=dmask, other=0.0).to(tl.float32) + w_offset)[None, :]
    if HAS_NB:
        x = x + tl.load(nb_ptr + cols, mask=dmask, other=0.0).to(tl.float32)[None, :]
    # Rows with a NaN/inf become exact zeros (as in the torch path): finite garbage statistics,
    # masked to NaN by the launcher, and a harmless KL reference for the token's other layers.
    x = tl.where(finite[:, None] & dmask[None, :], x, 0.0)
    if x_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand (bit-exact with the GPU's cvt.rn.bf16.f32 for finite x):
        # the interpreter's fp32 -> bf16 cast truncates, and its RTNE mode drops the carry.
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        xs = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        xs = x.to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + rows[:, None] * D + cols[None, :], xs, mask=rmask[:, None] & dmask[None, :])
    tl.store(finite_ptr + rows, finite.to(tl.int8), mask=rmask)

    xs32 = xs.to(tl.float32)
    for c in tl.static_range(C):
        t = tl.load(tgt_ptr + rows * CP + c, mask=rmask, other=-1)
        has = t >= 0
        t64 = tl.maximum(t, 0).to(tl.int64)
        wt = tl.load(
            w_ptr + t64[:, None] * stride_wv + cols[None, :],
            mask=has[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(b_ptr + t64, mask=has, other=0.0).to(tl.float32)
        zt = postprocess(
            tl.sum(xs32 * wt, 1), bias, logit_scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP
        )
        tl.store(thr_ptr + rows * CP + c, tl.where(has, zt, float("inf")), mask=rmask)


def dot_precision(operands_fp32: bool, precision: str) -> str:
    """``tl.dot``'s input precision: fp32 operands take TF32 tensor cores unless ``precision`` is
    ``"fp32"`` (IEEE, ~16x slower on Hopper); ignored for 16-bit operands."""
    if operands_fp32 and precision == "fp32":
        return "ieee"
    return "tf32"


def stage_dtype(w_u: Tensor, precision: str) -> torch.dtype:
    """The MMA operand dtype: ``W_U``'s (``"model"``) or fp32 (``"fp32"``)."""
    return torch.float32 if precision == "fp32" else w_u.dtype


def post_flags(head: Head) -> dict[str, bool]:
    return {
        "HAS_BIAS": head.unembed_bias is not None,
        "HAS_SCALE": head.logit_scale != 1.0,
        "HAS_SOFTCAP": head.softcap is not None,
    }


def stage_rows(
    hidden: Tensor,
    f_src: Tensor,
    src_off: Tensor,
    kind: Tensor,
    slot_tgt: Tensor,
    n_cols: int,
    head: Head,
    w_u: Tensor,
    stage_dtype: torch.dtype,
    interpret: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the norm pre-pass over ``R`` slots.

    Returns:
        ``x_stage [R, d]`` (``stage_dtype``), ``finite [R]`` int8 and rank thresholds
        ``thr [R, CP]`` fp32 (``CP = slot_tgt.shape[1]``).
    """
    r_pad, cp = slot_tgt.shape
    d = head.d_model
    device = hidden.device
    x_stage = torch.empty(r_pad, d, dtype=stage_dtype, device=device)
    slot_finite = torch.empty(r_pad, dtype=torch.int8, device=device)
    thr = torch.empty(r_pad, cp, dtype=torch.float32, device=device)
    norm = head.norm
    bias = head.unembed_bias
    softcap = head.softcap if head.softcap is not None else 1.0
    dummy = w_u  # never read: the matching constexpr flag prunes the load
    block_d = triton.next_power_of_2(d)
    # Interpreter: one program for many rows (per-op cost, not per-element); GPU: ~4k elements
    # per program keeps the [BLOCK_R, BLOCK_D] fp32 tile in registers.
    block_r = 128 if interpret else max(1, min(16, 4096 // block_d))
    _norm_stage_kernel[(triton.cdiv(r_pad, block_r),)](
        hidden,
        f_src,
        src_off,
        kind,
        hidden.stride(-1),
        f_src.stride(-1),
        norm.weight if norm.weight is not None else dummy,
        norm.bias if norm.bias is not None else dummy,
        float(norm.weight_offset),
        float(norm.eps),
        x_stage,
        slot_finite,
        slot_tgt,
        thr,
        w_u,
        w_u.stride(0),
        bias if bias is not None else dummy,
        float(head.logit_scale),
        float(softcap),
        r_pad,
        d,
        C=n_cols,
        CP=cp,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        IS_LAYER=norm.kind is NormKind.LAYER,
        HAS_NW=norm.weight is not None,
        HAS_NB=norm.bias is not None,
        **post_flags(head),
        num_warps=4 if block_d <= 2048 else 8,
    )
    return x_stage, slot_finite, thr


def check_mode(interpret: bool) -> None:
    """Raise if Triton's functions were decorated in another mode than ``TRITON_INTERPRET`` says.

    Triton picks interpreter or compiler when a function is decorated (at import), so setting the
    variable after ``triton`` (or this module) was imported leaves compiled-mode functions that
    fail obscurely in the interpreter, and the reverse.
    """
    decorated = {
        "triton.language": type(tl.sum).__name__ == "InterpretedFunction",
        __name__: type(_norm_stage_kernel).__name__ == "InterpretedFunction",
    }
    stale = [module for module, is_interpreted in decorated.items() if is_interpreted != interpret]
    if stale:
        raise RuntimeError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} but {', '.join(stale)} "
            f"{'was' if len(stale) == 1 else 'were'} imported "
            f"{'without' if interpret else 'with'} it: set the variable before anything imports "
            "triton (torch._dynamo, and so transformers, does)"
        )


def set_multiplicities(request, n_vocab: int, device: torch.device) -> Tensor:
    """``[max(S, 1), V]`` fp32: how often each id is listed in each token set. Multiplicities, not
    membership: like the torch path and the oracle, an id listed twice counts twice (the engine
    passes de-duplicated sets)."""
    mask = torch.zeros(max(len(request.token_sets), 1), n_vocab, dtype=torch.float32, device=device)
    if request.token_sets:
        # Flat indices set * V + id (host ids are copied without blocking), accumulated so that
        # repeated ids count, in one scatter.
        flat = torch.cat(
            [
                to_device_async(ids.long(), device) + j * n_vocab
                for j, (_, ids) in enumerate(request.token_sets)
            ]
        )
        mask.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return mask


def check_kernel_inputs(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    request,
    final_hidden: Tensor | None,
    precision: str,
) -> Tensor:
    """Validate a Triton strategy's arguments (beyond ``stats.check_inputs``): precision, device,
    operand dtypes. Returns ``W_U`` with unit stride along ``d``.

    Raises:
        ValueError: a bad precision, dtype or device mismatch; RuntimeError: no CUDA device and
            no interpreter.
    """
    check_precision(precision)
    interpret = interpreting()
    check_mode(interpret)
    device = hidden.device
    if device.type != "cuda" and not (device.type == "cpu" and interpret):
        raise RuntimeError(
            f"the Triton lens kernels need a CUDA device, got {device.type!r} (or set "
            "TRITON_INTERPRET=1 to run them in Triton's CPU interpreter)"
        )
    w_u = head.unembed
    operands = {"hidden": hidden, "W_U": w_u}
    if request.kl_final:
        operands["final_hidden"] = final_hidden
    for name, tensor in operands.items():
        if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be fp32, bf16 or fp16, got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, hidden on {device}")
    if targets.shape[1] < 1:
        raise ValueError("targets needs at least the next-token column")
    return w_u if w_u.stride(1) == 1 else w_u.contiguous()


def normalized_rows(rows: Tensor, head: Head, precision: str = "model") -> Tensor:
    """The normalised rows exactly as the kernel's MMA sees them (for tests and probes).

    Args:
        rows: ``[N, d]`` residual rows (fp32, bf16 or fp16).
        head: the read-out path whose final norm is applied.
        precision: ``"model"`` (rounded to ``W_U``'s dtype) or ``"fp32"``.

    Returns:
        ``[N, d]`` in the operand dtype; rows with a NaN/inf are zeros.
    """
    if rows.dim() != 2 or rows.shape[1] != head.d_model:
        raise ValueError(f"rows must be [N, {head.d_model}], got {tuple(rows.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_mode(interpreting())
    n = rows.shape[0]
    device = rows.device
    kind = torch.full((n,), KIND_HIDDEN, dtype=torch.int8, device=device)
    src_off = torch.arange(n, device=device, dtype=torch.int64) * rows.stride(0)
    no_targets = torch.full((n, 1), -1, dtype=torch.int32, device=device)
    w_u = head.unembed
    x_stage, _, _ = stage_rows(
        rows,
        rows,
        src_off,
        kind,
        no_targets,
        0,
        head,
        w_u,
        stage_dtype(w_u, precision),
        interpreting(),
    )
    return x_stage
