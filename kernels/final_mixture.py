"""KL to the final layer from one d-long dot product per row: the final layer's mixture of W_U rows.

For a head without a soft-cap the logits are affine in the staged row: ``z = c (x_hat W^T + b)``
(``c = Head.logit_scale``, ``b = b_U``). With ``q = softmax(z_q)`` the final layer's distribution
at a token and ``p = softmax(z_p)`` a layer's at the same token::

    KL(q || p) = sum_v q_v (z_q,v - z_p,v) + lse_p - lse_q
               = c (x_hat_q - x_hat_p) . g + lse_p - lse_q,        g = sum_v q_v W_v   [d]

(the bias terms cancel because ``sum q = 1``). One pass over the vocabulary for the final rows
gives ``lse_q [T]`` and ``g [T, d]``; every layer row's KL is then its own ``lse_p``, which the
lens computes anyway, and one dot product. The fused kernel (``lens_triton``) runs without KL:
no final-layer slot in each row block (whose padding cost 10 to 21 % of its MMA at the benchmark
shapes) and no per-logit KL work in its epilogue (kernels/DESIGN.md, "KL from the final layer's
mixture").

The identity is exact for the products as the lens computes them: ``x_hat`` are the rows exactly
as the MMA sees them (``normalized_rows``) and ``W`` the operand ``W_U``, so only the fp32
summation order differs. ``g`` must be accurate to fp32 for the difference of the two terms to
be: ``e = exp(z_q - m)`` is split into ``hi + lo`` in the GEMM's operand dtype when the GEMM rounds
its operands (bf16 on a GPU), so two 16-bit GEMMs give ``g`` to a relative ``2^-17``.

It does not apply (``mixture_applies``) to a soft-capped head (``tanh`` is not affine), to fp16
operands (``e`` below ``6e-8`` underflows in fp16) or to fp32 operands multiplied in TF32 (the
lens's own products are then rounded differently from the mixture's): those keep the kernel's
own KL.
"""

from __future__ import annotations

import torch
from torch import Tensor

from codelens.kernels.head import Head
from codelens.kernels.lens_torch import matmul_fp32
from codelens.kernels.norm_stage import normalized_rows

DEFAULT_TOKEN_CHUNK = 1024
"""Final rows per mixture pass: with ``DEFAULT_VOCAB_CHUNK`` a 16 MiB fp32 logit buffer, and
GEMMs with enough rows to run at full speed."""
DEFAULT_VOCAB_CHUNK = 4096


def mixture_applies(head: Head, operand_dtype: torch.dtype, tf32: bool) -> bool:
    """Whether KL can come from the final layer's mixture for this head and GEMM (see above).

    Args:
        head: the read-out path; a soft-capped one never qualifies.
        operand_dtype: the dtype the lens multiplies in (``norm_stage.stage_dtype``).
        tf32: whether fp32 operands are multiplied in TF32 (a CUDA device in ``"model"``
            precision).
    """
    if head.softcap is not None:
        return False
    if operand_dtype == torch.bfloat16:
        return True
    return operand_dtype == torch.float32 and not tf32


def split_operand(e: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``e`` (fp32) as parts exactly representable in ``dtype`` whose sum is ``e`` to ``2^-17``.

    fp32 needs no split. For bf16: ``hi = bf16(e)``, ``lo = bf16(e - hi)``; a GEMM multiplying
    them in bf16 with fp32 accumulation then sees ``e`` at 16 significant bits instead of 8.
    """
    if dtype == torch.float32:
        return (e,)
    if dtype != torch.bfloat16:
        raise ValueError(f"the mixture splits fp32 into bf16 parts only, got {dtype}")
    hi = e.to(dtype).float()
    return hi, (e - hi).to(dtype).float()


def final_mixture(
    x_final: Tensor,
    head: Head,
    w_u: Tensor,
    *,
    split: bool,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> tuple[Tensor, Tensor]:
    """The final rows' ``lse_q [n]`` and mixture ``g = sum_v q_v W_v [n, d]``, both fp32.

    One online pass over vocabulary chunks (``m`` the running max, ``e = exp(z - m')``)::

        s <- s e^(m - m') + sum e,     G <- G e^(m - m') + e @ W_chunk,     g = G / s

    Args:
        x_final: ``[n, d]`` the final rows exactly as the lens's GEMM sees them (operand dtype).
        head: the read-out path (no soft-cap); its bias and scale enter ``z``.
        w_u: ``W_U [V, d]`` as the lens reads it; widened to fp32 per chunk when ``x_final`` is.
        split: multiply ``e`` in ``W``'s 16-bit dtype as ``hi + lo`` (``split_operand``): set it
            where the GEMM rounds its operands (a GPU: two bf16 GEMMs). Without it ``e`` meets
            ``W`` widened to fp32 in one GEMM, exact on any device (on a CPU 16-bit operands are
            widened anyway; on a GPU it forgoes the tensor cores).
        vocab_chunk: vocabulary entries per step.
    """
    if head.softcap is not None:
        raise ValueError(
            "the final-layer mixture needs a head without a soft-cap (tanh is not affine)"
        )
    n, d = x_final.shape
    n_vocab = head.vocab_size
    device = x_final.device
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    s = torch.zeros(n, dtype=torch.float32, device=device)
    g = torch.zeros(n, d, dtype=torch.float32, device=device)
    product = torch.empty_like(g)
    z_buf = torch.empty(n, min(vocab_chunk, n_vocab), dtype=torch.float32, device=device)
    bias = head.unembed_bias
    for v0 in range(0, n_vocab, vocab_chunk):
        v1 = min(n_vocab, v0 + vocab_chunk)
        w = w_u[v0:v1]
        if w.dtype != x_final.dtype:
            w = w.float()  # precision "fp32" with a 16-bit head: exact widening
        z = matmul_fp32(x_final, w, z_buf[:, : v1 - v0])
        z = head.postprocess(z, None if bias is None else bias[v0:v1])
        m_new = torch.maximum(m, z.max(1).values)
        alpha = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf, z finite)
        e = torch.exp(z - m_new[:, None])
        s = s * alpha + e.sum(1)
        g *= alpha[:, None]
        # e is fp32: a 16-bit W would round it to W's dtype in the GEMM (matmul_fp32 on a GPU)
        parts, w_e = (split_operand(e, w.dtype), w) if split else ((e,), w.float())
        for part in parts:
            g += matmul_fp32(part, w_e.T, product)
        m = m_new
    return m + torch.log(s), g / s[:, None]


def kl_from_mixture(
    hidden: Tensor,
    final_rows: Tensor,
    head: Head,
    lse: Tensor,
    precision: str,
    *,
    final_shared: bool,
    split: bool,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> Tensor:
    """``KL(q || p) [L, T]`` for every lens row from its ``lse`` and the final layer's mixture.

    Args:
        hidden: ``[L, T, d]`` residual rows (the lens's input).
        final_rows: ``[T, d]`` the final layer's residual rows (``hidden[-1]`` when shared).
        head: the read-out path (``mixture_applies`` must hold).
        lse: ``[L, T]`` fp32, each row's log-sum-exp as the lens computed it.
        precision: the lens's precision (``"model"`` or ``"fp32"``): sets how rows are staged.
        final_shared: the last layer is the reference; its KL is exactly 0.
        split: see ``final_mixture``.
        token_chunk, vocab_chunk: tokens per mixture pass and vocabulary entries per step.

    Returns:
        ``[L, T]`` fp32, clamped at 0 (rounding can take a near-zero KL below it).
    """
    n_layers, n_tokens, _ = hidden.shape
    w_u = head.unembed if head.unembed.stride(-1) == 1 else head.unembed.contiguous()
    kl = torch.empty(n_layers, n_tokens, dtype=torch.float32, device=hidden.device)
    for t0 in range(0, n_tokens, token_chunk):
        t1 = min(n_tokens, t0 + token_chunk)
        x_q = normalized_rows(final_rows[t0:t1], head, precision)
        lse_q, g = final_mixture(x_q, head, w_u, split=split, vocab_chunk=vocab_chunk)
        x_q = x_q.float()
        for layer in range(n_layers):
            x_p = normalized_rows(hidden[layer, t0:t1], head, precision).float()
            # The difference first: the two dot products are ~|z| each and cancel near the end.
            dot = ((x_q - x_p) * g).sum(-1)
            kl[layer, t0:t1] = lse[layer, t0:t1] - lse_q + head.logit_scale * dot
    if final_shared:
        kl[-1] = 0.0
    return kl.clamp_min_(0.0)


__all__ = ["final_mixture", "kl_from_mixture", "mixture_applies", "split_operand"]
