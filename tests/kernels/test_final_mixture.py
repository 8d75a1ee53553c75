"""KL to the final layer from the final layer's mixture of W_U rows (``kernels/final_mixture.py``),
against float64 on the rows exactly as the lens's GEMM sees them (``normalized_rows``)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
        allow_module_level=True,
    )

from codelens.kernels import FinalNorm, Head, NormKind
from codelens.kernels.final_mixture import (
    final_mixture,
    kl_from_mixture,
    mixture_applies,
    split_operand,
)
from codelens.kernels.norm_stage import normalized_rows

pytestmark = pytest.mark.triton

F64 = torch.float64


def scaled_head(d: int, V: int, dtype: torch.dtype, gen: torch.Generator, **extra) -> Head:
    """An RMS-norm head with a bias and a logit scale (Granite's read-out): both enter z."""
    norm = FinalNorm(NormKind.RMS, (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype), None, 1e-5)
    w = (0.5 * torch.randn(V, d, generator=gen)).to(dtype)
    bias = (0.3 * torch.randn(V, generator=gen)).to(dtype)
    return Head(norm, w, bias, logit_scale=extra.pop("logit_scale", 0.7), **extra)


def logits64(x: torch.Tensor, head: Head) -> torch.Tensor:
    return head.postprocess(x.to(F64) @ head.unembed.to(F64).T, head.unembed_bias)


@pytest.mark.parametrize(
    "dtype,split",
    [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16-one-gemm", "bf16-hi-lo"],
)
def test_final_mixture_matches_float64(dtype, split):
    gen = torch.Generator().manual_seed(0)
    head = scaled_head(40, 517, dtype, gen)
    x = normalized_rows(torch.randn(9, 40, generator=gen) * 3, head)
    lse_q, g = final_mixture(x, head, head.unembed, split=split, vocab_chunk=100)

    z = logits64(x, head)
    q = torch.softmax(z, -1)
    want_g = q @ head.unembed.to(F64)
    assert (lse_q.double() - torch.logsumexp(z, -1)).abs().max() < 1e-5
    # fp32 accumulation of e at 24 bits (one GEMM) or 16 (bf16 hi + lo): relative to |W|.
    scale = head.unembed.double().abs().max()
    assert (g.double() - want_g).abs().max() < 2e-5 * scale


def test_split_operand_keeps_sixteen_bits():
    e = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) ** 8  # down to ~1e-30
    hi, lo = split_operand(e, torch.bfloat16)
    assert torch.equal(hi, hi.to(torch.bfloat16).float())
    assert torch.equal(lo, lo.to(torch.bfloat16).float())
    assert ((hi + lo - e).abs() <= 2.0**-17 * e).all()
    assert split_operand(e, torch.float32) == (e,)
    with pytest.raises(ValueError, match="bf16"):
        split_operand(e, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-final", "separate-final"])
def test_kl_from_mixture_matches_float64(dtype, shared):
    gen = torch.Generator().manual_seed(2)
    L, T, d, V = 4, 11, 48, 301
    head = scaled_head(d, V, dtype, gen)
    hidden = (torch.randn(L, T, d, generator=gen) * torch.linspace(1, 4, L)[:, None, None]).to(
        dtype
    )
    final = hidden[-1] if shared else (torch.randn(T, d, generator=gen) * 4).to(dtype)

    x_p = normalized_rows(hidden.reshape(L * T, d), head).view(L, T, d)
    x_q = normalized_rows(final, head)
    log_p = torch.log_softmax(logits64(x_p, head), -1)
    log_q = torch.log_softmax(logits64(x_q, head), -1)
    want = (log_q.exp() * (log_q - log_p)).sum(-1)
    lse = torch.logsumexp(logits64(x_p, head), -1).float()

    # split=True is what a GPU runs for bf16: the mixture's e at 16 bits.
    got = kl_from_mixture(
        hidden, final, head, lse, "model", final_shared=shared, split=dtype == torch.bfloat16,
        token_chunk=4, vocab_chunk=64,
    )  # fmt: skip
    assert got.shape == (L, T) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 3e-5
    assert (got >= 0).all()
    if shared:
        assert (got[-1] == 0).all()


def test_mixture_applies_only_where_the_identity_is_exact():
    gen = torch.Generator().manual_seed(3)
    plain = scaled_head(16, 50, torch.bfloat16, gen)
    capped = scaled_head(16, 50, torch.bfloat16, gen, softcap=30.0)
    assert mixture_applies(plain, torch.bfloat16, tf32=False)
    assert mixture_applies(plain, torch.float32, tf32=False)
    assert not mixture_applies(plain, torch.float32, tf32=True)  # TF32 rounds the lens's products
    assert not mixture_applies(plain, torch.float16, tf32=False)  # e underflows in fp16
    assert not mixture_applies(capped, torch.bfloat16, tf32=False)  # tanh is not affine
    with pytest.raises(ValueError, match="soft-cap"):
        final_mixture(
            normalized_rows(torch.randn(2, 16), capped), capped, capped.unembed, split=False
        )
