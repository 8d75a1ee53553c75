"""The Triton lens strategies (fused; chunked GEMM + fold), run in Triton's CPU interpreter,
against two float64 oracles. Every contract test runs once per strategy (the ``lens_kernel``
fixture).

* The **staged oracle**: ``lens_stats_naive`` on the normalised rows exactly as the kernel's MMA
  sees them (``normalized_rows``: rounded to ``W_U``'s dtype) through an identity norm. It isolates
  the kernel's own arithmetic (fp32 accumulation, online merges), so tolerances are tight at every
  dtype and ranks / top-k ids must be exact away from near-ties.
* The **model oracle**: ``lens_stats_naive`` on the raw rows. The kernel's error against it must
  be no worse than twice the torch path's own error plus a per-dtype allowance for rounding the
  normalised rows to bf16/fp16 (measured: ``benchmarks/results/kernel-accuracy-interpreter.md``).

Shapes are tiny and awkward on purpose: rows and vocabulary not multiples of the blocks, several
vocabulary chunks and row blocks, k not a power of two.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
        allow_module_level=True,
    )

from codelens.kernels import (
    FinalNorm,
    Head,
    LensImpl,
    LensRequest,
    NormKind,
    lens_stats,
    lens_stats_naive,
    lens_stats_torch,
    triton_strategy,
)
from codelens.kernels import lens_chunked as lens_chunked_module
from codelens.kernels import lens_triton as lens_triton_module
from codelens.kernels.lens_chunked import LensChunkedConfig, lens_stats_chunked
from codelens.kernels.lens_triton import (
    LensTritonConfig,
    _plan_layout,
    _slot_maps,
    default_config,
    lens_stats_triton,
)
from codelens.kernels.norm_stage import normalized_rows

pytestmark = pytest.mark.triton

FLOAT_FIELDS = (
    "lse",
    "entropy",
    "kl_final",
    "target_logprob",
    "ahead_logprob",
    "topk_logprobs",
    "set_logmass",
)
# Max |error| of the kernel's float statistics against the staged oracle (its own arithmetic:
# fp32 accumulation of exact products, online merges; |z| <= ~15 here; measured <= 6.7e-6).
TIGHT_ATOL = 3e-5
# Allowance against the model oracle, on top of 2x the torch path's own error: rounding the
# normalised rows to the operand dtype (measured maxima over CASES: fp16 2.4e-3, bf16 2.3e-2;
# fp32 6.7e-6, the torch path's level).
MODEL_ATOL = {torch.float32: 1e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}
# Small blocks and vocabulary chunks: several row blocks, chunks and raster groups at tiny shapes.
SMALL = LensTritonConfig(block_m=16, block_n=64, block_k=32, group_m=2, vocab_chunk=128)
# The chunked strategy's equivalent: several token blocks, vocabulary chunks (not a multiple of
# the fold step) and rows per fold program.
SMALL_CHUNKED = LensChunkedConfig(
    rows_per_gemm=16, vocab_chunk=100, fold_block_r=4, fold_block_v=32
)
# Entry points by name, looked up when a test runs (on a GPU, tests/kernels/conftest.py wraps them).
STRATEGIES = {
    "fused": ("lens_stats_triton", SMALL),
    # The fused kernel's epilogue folding each tile in two column slices (for BLOCK_N 256).
    "fused-subtiled": ("lens_stats_triton", dataclasses.replace(SMALL, epilogue_subtiles=2)),
    "chunked": ("lens_stats_chunked", SMALL_CHUNKED),
}


@pytest.fixture(params=sorted(STRATEGIES))
def lens_kernel(request):
    """One Triton strategy: ``run(hidden, head, targets, request, final, small=False, **kw)``;
    ``small`` selects its small-block configuration."""
    fn_name, small_config = STRATEGIES[request.param]

    def run(*args, small: bool = False, **kwargs):
        fn = globals()[fn_name]
        if small:
            kwargs.setdefault("config", small_config)
        elif request.param == "fused-subtiled":
            head = args[1]
            kwargs.setdefault(
                "config", dataclasses.replace(default_config(head.d_model), epilogue_subtiles=2)
            )
        return fn(*args, **kwargs)

    run.strategy = request.param
    return run


class _StagedNorm(FinalNorm):
    """Identity "norm": the oracle is fed rows that are already normalised and rounded."""

    def apply(self, h: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return h.to(dtype)


def make_head(kind: str, d: int, V: int, dtype: torch.dtype, gen: torch.Generator) -> Head:
    """A head of one of the supported families, with planted duplicate W rows (exact ties)."""
    w = torch.randn(V, d, generator=gen) * 0.5
    w[V // 2] = w[3]  # same logits as id 3, in another tile / vocabulary chunk
    w[V - 1] = w[7]  # and one in the ragged last tile
    norm_w = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    if kind == "layernorm_bias":
        norm_b = (0.2 * torch.randn(d, generator=gen)).to(dtype)
        norm = FinalNorm(NormKind.LAYER, norm_w, norm_b, 1e-5)
        return Head(norm, w.to(dtype), (0.5 * torch.randn(V, generator=gen)).to(dtype))
    if kind == "gemma_softcap":
        gw = (0.3 * torch.randn(d, generator=gen)).to(dtype)
        norm = FinalNorm(NormKind.RMS, gw, None, 1e-6, weight_offset=1.0)
        return Head(norm, w.to(dtype), softcap=5.0)
    if kind == "granite_scale":
        norm = FinalNorm(NormKind.RMS, norm_w, None, 1e-5)
        bias = (0.3 * torch.randn(V, generator=gen)).to(dtype)
        return Head(norm, w.to(dtype), bias, logit_scale=0.4)
    if kind == "padded_vocab":
        # Trailing all-zero rows, as in heads padded to a multiple of 64: exact ties at logit 0.
        w[V - 20 :] = 0.0
        return Head(FinalNorm(NormKind.RMS, norm_w, None, 1e-6), w.to(dtype))
    raise ValueError(kind)


def make_inputs(L: int, T: int, d: int, V: int, A: int, dtype: torch.dtype, gen: torch.Generator):
    """Residual rows ``[L, T, d]``, norm growing with depth, and targets ``[T, 1 + A]``."""
    scale = torch.linspace(1.0, 4.0, L)[:, None, None]
    hidden = (torch.randn(L, T, d, generator=gen) * scale + 0.5).to(dtype)
    targets = torch.randint(0, V - 20, (T, 1 + A), generator=gen)  # never a padding row
    targets[-1] = -1  # the last token has no next token
    for j in range(1, A + 1):
        targets[T - 1 - j :, j] = -1  # look-ahead columns run out earlier
    targets[0, 0] = V // 2  # a target with an exact twin (id 3)
    return hidden, targets


def token_sets(V: int) -> tuple[tuple[str, torch.Tensor], ...]:
    return (
        ("python", torch.tensor([1, 4, 9, 9, V // 2, V - 1])),  # 9 listed twice counts twice
        ("empty", torch.tensor([], dtype=torch.long)),
        ("one", torch.tensor([3])),
    )


def staged_oracle(hidden, head, targets, request, final_hidden, precision="model"):
    """``lens_stats_naive`` on the kernel's own normalised, rounded rows."""
    L, T, d = hidden.shape
    xs = normalized_rows(hidden.reshape(L * T, d), head, precision).view(L, T, d)
    xf = None if final_hidden is None else normalized_rows(final_hidden, head, precision)
    staged = dataclasses.replace(head, norm=_StagedNorm(NormKind.RMS, None, None, 0.0))
    return lens_stats_naive(xs, staged, targets, request, xf), xs, staged


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = a.isfinite() & b.isfinite()
    return (a[ok].double() - b[ok].double()).abs().max().item() if ok.any() else 0.0


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bitwise equality (NaN payloads included); both None counts as equal."""
    if a is None or b is None:
        return a is None and b is None
    if a.is_floating_point():
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    return torch.equal(a, b)


def assert_same_nonfinite(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN positions differ"
    assert torch.equal(a.isneginf(), b.isneginf()), f"{name}: -inf positions differ"


def assert_tight(got, want, xs, staged_head, targets, finite, atol=TIGHT_ATOL):
    """Float statistics within ``atol``; ranks and top-k ids exact away from near-ties."""
    for name in FLOAT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        a, b = a[finite], b[finite]
        assert_same_nonfinite(a, b, name)
        err = max_err(a, b)
        assert err <= atol, f"{name}: max error {err:.3g} > {atol:.3g} against the staged oracle"

    z = staged_head.logits(xs.double(), torch.float64)  # [L, T, V]
    zt = z.gather(-1, targets.clamp_min(0).expand(z.shape[0], -1, -1))  # [L, T, C]
    # Another logit within a rounding step of the target's, exact ties included: the rank
    # threshold is the target's logit from the pre-pass dot, which may differ from the tile's by
    # a rounding step (the torch path's semantics, see lens_torch).
    close = (z[..., None, :] - zt[..., None]).abs() <= 1e-5 * (1 + zt.abs()[..., None])
    near_tie = (close.sum(-1) > 1) & (targets >= 0)
    ranks = torch.cat([got.target_rank[..., None], got.ahead_rank], -1)
    want_ranks = torch.cat([want.target_rank[..., None], want.ahead_rank], -1)
    keep = ~near_tie & finite[..., None]
    assert torch.equal(ranks[keep], want_ranks[keep]), "ranks differ away from near-ties"
    assert keep.sum() >= 0.6 * finite[..., None].expand_as(keep).sum(), "rank check is vacuous"

    ids, want_ids = got.topk_ids.long(), want.topk_ids.long()
    logp = torch.log_softmax(z, -1)
    at_got = logp.gather(-1, ids.clamp_min(0))[finite]
    at_want = logp.gather(-1, want_ids)[finite]
    # The returned ids carry the oracle's k largest log-probs, in order; ids may differ only
    # between entries whose logits are within rounding of each other.
    assert (at_got - at_want).abs().max() <= atol
    differ = ids[finite] != want_ids[finite]
    assert ((at_got - at_want).abs()[differ] <= 1e-5 * (1 + at_want.abs()[differ])).all()
    assert differ.float().mean() <= 0.02, "too many top-k id mismatches"
    sorted_ids = ids[finite].sort(-1).values
    assert (sorted_ids[..., 1:] != sorted_ids[..., :-1]).all(), "duplicate top-k ids"


def assert_model_accuracy(got, hidden, head, targets, request, final_hidden, atol):
    """Kernel error vs the model oracle <= 2x the torch path's error + ``atol``; returns errors."""
    want = lens_stats_naive(hidden, head, targets, request, final_hidden)
    ref = lens_stats_torch(hidden, head, targets, request, final_hidden)
    finite = want.finite
    assert torch.equal(got.finite, finite)
    errors = {}
    for name in FLOAT_FIELDS:
        a, b, c = getattr(got, name), getattr(want, name), getattr(ref, name)
        if a is None:
            assert b is None
            continue
        a, b, c = a[finite], b[finite], c[finite]
        assert_same_nonfinite(a, b, name)
        err, err_torch = max_err(a, b), max_err(c, b)
        errors[name] = (err, err_torch)
        assert err <= 2 * err_torch + atol, f"{name}: {err:.3g} (torch {err_torch:.3g}) > bound"
    return errors


CASES = [
    # kind, dtype, L, T, d, V, k, A, small blocks
    ("layernorm_bias", torch.float32, 3, 11, 48, 301, 5, 2, False),
    ("gemma_softcap", torch.float32, 4, 7, 40, 517, 4, 1, True),
    ("granite_scale", torch.float16, 3, 9, 48, 301, 1, 2, False),
    ("padded_vocab", torch.float16, 2, 13, 24, 200, 5, 0, True),
    ("layernorm_bias", torch.bfloat16, 3, 10, 48, 301, 8, 2, True),
    ("gemma_softcap", torch.bfloat16, 4, 6, 32, 389, 5, 1, False),
    ("granite_scale", torch.bfloat16, 3, 8, 40, 301, 3, 1, True),  # KL from the mixture (fused)
]


@pytest.mark.parametrize(
    "kind,dtype,L,T,d,V,k,A,small", CASES, ids=[f"{c[0]}-{str(c[1])[6:]}" for c in CASES]
)
def test_matches_float64_oracles(lens_kernel, kind, dtype, L, T, d, V, k, A, small):
    gen = torch.Generator().manual_seed(CASES.index((kind, dtype, L, T, d, V, k, A, small)))
    head = make_head(kind, d, V, dtype, gen)
    hidden, targets = make_inputs(L, T, d, V, A, dtype, gen)
    request = LensRequest(k=k, token_sets=token_sets(V))
    got = lens_kernel(hidden, head, targets, request, hidden[-1], small=small)

    want, xs, staged_head = staged_oracle(hidden, head, targets, request, hidden[-1])
    assert_tight(got, want, xs, staged_head, targets, got.finite)
    assert_model_accuracy(got, hidden, head, targets, request, hidden[-1], MODEL_ATOL[dtype])
    assert got.kl_final[-1].abs().max() == 0.0  # the final layer is its own reference
    assert torch.isneginf(got.set_logmass[..., 1]).all()  # the empty set


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_staged_rows_round_to_nearest_like_torch(dtype):
    gen = torch.Generator().manual_seed(10)
    head = make_head("layernorm_bias", 96, 64, dtype, gen)
    rows = torch.randn(200, 96, generator=gen) * 3
    got = normalized_rows(rows, head)
    want = head.norm.apply(rows).to(dtype)  # fp32 norm, then round-to-nearest-even
    assert got.dtype == dtype
    # The fp32 norm's summation order may move a value across a rounding boundary, rarely;
    # truncation instead of rounding would change about half of them.
    differ = got != want
    assert differ.float().mean() < 0.01
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
    assert ((got.float() - want.float()).abs()[differ] <= ulp[differ]).all()


def test_fp32_precision_mode_reaches_torch_accuracy(lens_kernel):
    gen = torch.Generator().manual_seed(5)
    head = make_head("layernorm_bias", 48, 301, torch.bfloat16, gen)
    hidden, targets = make_inputs(3, 9, 48, 301, 2, torch.bfloat16, gen)
    request = LensRequest(k=5, token_sets=token_sets(301))
    got = lens_kernel(hidden, head, targets, request, hidden[-1], precision="fp32")
    errors = assert_model_accuracy(got, hidden, head, targets, request, hidden[-1], 1e-5)
    assert max(err for err, _ in errors.values()) < 1e-4


def test_exact_ties_go_to_the_smaller_id_across_chunks(lens_kernel):
    gen = torch.Generator().manual_seed(1)
    L, T, d, V = 2, 5, 40, 700
    w = torch.randn(V, d, generator=gen) * 0.3
    u = torch.randn(d, generator=gen)
    # A five-way tie for the top: three in the first tile (64 columns), two in later vocabulary
    # chunks (128 columns each).
    w[[650, 11, 300, 40, 12]] = u
    w[[100, 600]] = w[5].clone()
    head = Head(FinalNorm(NormKind.RMS, None, None, 1e-6), w)
    hidden = u + 0.3 * torch.randn(L, T, d, generator=gen)
    targets = torch.full((T, 1), 300)
    request = LensRequest(k=6, kl_final=False, entropy=False)
    got = lens_kernel(hidden, head, targets, request, small=True)
    want = lens_stats_naive(hidden, head, targets, request)

    assert (got.topk_ids[..., :5] == torch.tensor([11, 12, 40, 300, 650], dtype=torch.int32)).all()
    assert torch.equal(got.topk_ids, want.topk_ids)
    # The four exact twins of the target are not strictly greater; the rank threshold (the
    # pre-pass dot) may differ from the tiles' logits by a rounding step, so up to 4.
    assert ((got.target_rank >= 0) & (got.target_rank <= 4)).all()
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
    # k = 2: three tied candidates compete for two slots inside one tile.
    top2 = lens_kernel(hidden, head, targets, LensRequest(k=2, kl_final=False), small=True)
    assert (top2.topk_ids == torch.tensor([11, 12], dtype=torch.int32)).all()


def test_top_k_with_fresh_candidates_in_every_tile(lens_kernel):
    """Many insertions per tile and chunk (a bias rising along the vocabulary), with exact ties
    among the trailing all-zero rows: the exact top-k, ties to the smaller id."""
    gen = torch.Generator().manual_seed(21)
    L, T, d, V, k = 3, 7, 32, 900, 12
    head = make_head("padded_vocab", d, V, torch.float32, gen)
    # A bias that rises along the vocabulary puts fresh top-k candidates in every later tile;
    # its steps make the trailing all-zero rows exact ties.
    head = Head(head.norm, head.unembed, (torch.arange(V) // 64) * 0.4)
    hidden, targets = make_inputs(L, T, d, V, 1, torch.float32, gen)
    request = LensRequest(k=k, kl_final=False)
    got = lens_kernel(hidden, head, targets, request, small=True)
    want = lens_stats_naive(hidden, head, targets, request)
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="TF32 is a GPU's: the interpreter has IEEE"
)
def test_fp32_heads_take_tf32_on_a_gpu_within_its_rounding(lens_kernel):
    """An fp32 checkpoint on a GPU (``precision="model"``): the staged rows and ``W_U`` each
    rounded to TF32's 10 mantissa bits, so every logit is within ``2^-9 sum_i |x_i w_i|`` (times
    the logit scale) of the exact one, and each statistic within a few times that."""
    gen = torch.Generator().manual_seed(12)
    head = make_head("granite_scale", 48, 301, torch.float32, gen)
    hidden, targets = make_inputs(3, 9, 48, 301, 2, torch.float32, gen)
    request = LensRequest(k=5, token_sets=token_sets(301))
    got = lens_kernel(hidden, head, targets, request, hidden[-1], precision="model")
    want = lens_stats_naive(hidden, head, targets, request, hidden[-1])
    xs = normalized_rows(hidden.reshape(-1, 48), head, "fp32")
    logit_bound = 2.0**-9 * (xs.abs() @ head.unembed.abs().T).max().item() * head.logit_scale
    for name in FLOAT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        err = 0.0 if a is None else max_err(a[got.finite], b[got.finite])
        assert err <= 4 * logit_bound, f"{name}: {err:.3g} > 4 x {logit_bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_non_finite_rows_are_flagged(lens_kernel, dtype):
    gen = torch.Generator().manual_seed(2)
    head = make_head("granite_scale", 32, 257, dtype, gen)
    hidden, targets = make_inputs(3, 8, 32, 257, 1, dtype, gen)
    hidden[0, 2, 5] = torch.inf
    hidden[1, 6, 0] = torch.nan
    request = LensRequest(k=3, token_sets=token_sets(257))
    got = lens_kernel(hidden, head, targets, request, hidden[-1], small=True)

    bad = torch.zeros(3, 8, dtype=torch.bool)
    bad[0, 2] = bad[1, 6] = True
    assert torch.equal(got.finite, ~bad)
    for name in ("lse", "entropy", "kl_final", "target_logprob"):
        assert getattr(got, name)[bad].isnan().all(), name
    for name in ("ahead_logprob", "topk_logprobs", "set_logmass"):
        assert getattr(got, name)[bad].isnan().all(), name
    assert (got.target_rank[bad] == -1).all() and (got.ahead_rank[bad] == -1).all()
    assert (got.topk_ids[bad] == -1).all()
    ref = lens_stats_torch(hidden, head, targets, request, hidden[-1])
    good = ~bad
    for name in ("lse", "kl_final", "entropy"):
        a, b = getattr(got, name)[good], getattr(ref, name)[good]
        torch.testing.assert_close(a, b, atol=MODEL_ATOL[dtype], rtol=0, msg=name)


def test_final_hidden_shared_or_separate(lens_kernel):
    gen = torch.Generator().manual_seed(3)
    head = make_head("layernorm_bias", 48, 301, torch.float32, gen)
    hidden, targets = make_inputs(3, 9, 48, 301, 1, torch.float32, gen)
    final = torch.randn(9, 48, generator=gen) * 3  # a final layer that is not among the lens rows
    request = LensRequest(k=4)

    shared = lens_kernel(hidden, head, targets, request, hidden[-1], small=True)
    copied = lens_kernel(hidden, head, targets, request, hidden[-1].clone(), small=True)
    other = lens_kernel(hidden, head, targets, request, final, small=True)

    assert (shared.kl_final[-1] == 0).all()
    assert copied.kl_final[-1].abs().max() < 1e-5  # same values, recomputed as a separate row
    # Other row-block compositions: equal up to the summation order of the interpreter's matmul.
    for name in ("lse", "entropy", "target_logprob", "topk_logprobs", "kl_final"):
        a, b = getattr(shared, name), getattr(copied, name)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, equal_nan=True, msg=name)
    assert torch.equal(shared.topk_ids, copied.topk_ids)
    want, xs, staged_head = staged_oracle(hidden, head, targets, request, final)
    assert_tight(other, want, xs, staged_head, targets, other.finite)
    assert (other.kl_final[-1] > 0.1).all()


def test_final_layer_only(lens_kernel):
    gen = torch.Generator().manual_seed(4)
    head = make_head("gemma_softcap", 32, 200, torch.float32, gen)
    hidden, targets = make_inputs(1, 6, 32, 200, 1, torch.float32, gen)
    request = LensRequest(k=2, token_sets=token_sets(200))
    got = lens_kernel(hidden, head, targets, request, hidden[-1], small=True)
    want, xs, staged_head = staged_oracle(hidden, head, targets, request, hidden[-1])
    assert_tight(got, want, xs, staged_head, targets, got.finite)
    assert (got.kl_final == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-final", "separate-final"])
def test_fused_kl_from_the_mixture_or_the_kernel_agree(dtype, shared):
    """The fused kernel's two KL paths: the final layer's mixture (the default, where the head
    allows it: kernels/final_mixture.py) and the in-kernel final-layer slot."""
    gen = torch.Generator().manual_seed(11)
    head = make_head("granite_scale", 40, 301, dtype, gen)
    hidden, targets = make_inputs(4, 9, 40, 301, 1, dtype, gen)
    final = hidden[-1] if shared else (torch.randn(9, 40, generator=gen) * 3).to(dtype)
    request = LensRequest(k=4, token_sets=token_sets(301))
    mixture = lens_stats_triton(hidden, head, targets, request, final, config=SMALL)
    slot = lens_stats_triton(
        hidden, head, targets, request, final,
        config=dataclasses.replace(SMALL, kl_by_mixture=False),
    )  # fmt: skip

    want, xs, staged_head = staged_oracle(hidden, head, targets, request, final)
    for got in (mixture, slot):
        assert_tight(got, want, xs, staged_head, targets, got.finite)
    # Without KL the kernel packs rows densely (other row blocks), the same per-row arithmetic.
    for name in ("lse", "entropy", "target_logprob", "topk_logprobs", "kl_final"):
        a, b = getattr(mixture, name), getattr(slot, name)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, equal_nan=True, msg=name)
    assert torch.equal(mixture.topk_ids, slot.topk_ids)
    assert (mixture.kl_final[-1] == 0).all() == shared


def test_statistics_switched_off_and_several_launches():
    gen = torch.Generator().manual_seed(6)
    head = make_head("layernorm_bias", 24, 150, torch.float16, gen)
    hidden, targets = make_inputs(3, 21, 24, 150, 1, torch.float16, gen)
    request = LensRequest(k=3, entropy=False, kl_final=False)
    one = lens_stats_triton(hidden, head, targets, request, config=SMALL)
    # 16-slot launches: one token block of one layer per launch.
    many = lens_stats_triton(
        hidden, head, targets, request, config=dataclasses.replace(SMALL, max_slots=16)
    )

    assert one.entropy is None and one.kl_final is None
    assert one.set_logmass.shape == (3, 21, 0)
    # Same row blocks and vocabulary chunks, split over launches: the same arithmetic.
    for field in dataclasses.fields(one):
        assert same_bits(getattr(one, field.name), getattr(many, field.name)), field.name
    want, xs, staged_head = staged_oracle(hidden, head, targets, request, None)
    assert_tight(one, want, xs, staged_head, targets, one.finite)


def test_bitwise_deterministic(lens_kernel):
    gen = torch.Generator().manual_seed(7)
    head = make_head("gemma_softcap", 40, 517, torch.bfloat16, gen)
    hidden, targets = make_inputs(4, 7, 40, 517, 2, torch.bfloat16, gen)
    request = LensRequest(k=5, token_sets=token_sets(517))
    first = lens_kernel(hidden, head, targets, request, hidden[-1], small=True)
    second = lens_kernel(hidden, head, targets, request, hidden[-1], small=True)
    for field in dataclasses.fields(first):
        assert same_bits(getattr(first, field.name), getattr(second, field.name)), field.name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("strategy", ["fused", "chunked"])
def test_the_host_never_waits_for_the_device(strategy, dtype, device_reads):
    """With the targets and token sets on the host (as the pipeline passes them), a strategy's
    host code reads no tensor value back, so the host can queue the next batch's work while the
    device runs this one; and the result is the one with the targets on the device."""
    module = lens_chunked_module if strategy == "chunked" else lens_triton_module
    run = getattr(module, STRATEGIES[strategy][0])  # the raw entry point: inputs placed here
    gen = torch.Generator().manual_seed(3)
    head = device_reads.on_device(make_head("granite_scale", 32, 300, dtype, gen))
    hidden, targets = make_inputs(3, 9, 32, 300, 2, dtype, gen)
    hidden = device_reads.on_device(hidden)
    request = LensRequest(k=5, token_sets=token_sets(300))
    on_device = run(hidden, head, device_reads.on_device(targets), request, hidden[-1])
    with device_reads.forbidden():
        from_host = run(hidden, head, targets, request, hidden[-1])
    for field in dataclasses.fields(from_host):
        assert same_bits(getattr(from_host, field.name), getattr(on_device, field.name)), field.name


@pytest.mark.parametrize(
    "impl,k,want",
    [
        ("triton-fused", 2, LensImpl.TRITON_FUSED),
        ("triton-chunked", 2, LensImpl.TRITON_CHUNKED),
        ("triton", 2, triton_strategy(32, 2)),
        ("triton", 65, LensImpl.TRITON_CHUNKED),  # above what the fused kernel keeps
    ],
)
def test_dispatch_runs_each_strategy_under_the_interpreter(impl, k, want):
    gen = torch.Generator().manual_seed(8)
    # bf16: the same arithmetic in the interpreter and on a GPU (an fp32 head would take TF32
    # on a GPU in lens_stats' default precision, "model").
    head = make_head("granite_scale", 32, 200, torch.bfloat16, gen)
    hidden, targets = make_inputs(2, 5, 32, 200, 0, torch.bfloat16, gen)
    request = LensRequest(k=k)
    got, chosen = lens_stats(hidden, head, targets, request, hidden[-1], impl=impl)
    assert chosen is want
    direct = {LensImpl.TRITON_FUSED: lens_stats_triton, LensImpl.TRITON_CHUNKED: lens_stats_chunked}
    ref = direct[want](hidden, head, targets, request, hidden[-1])
    assert torch.equal(got.lse, ref.lse) and torch.equal(got.topk_ids, ref.topk_ids)


def test_the_fused_kernel_refuses_a_k_it_cannot_hold():
    gen = torch.Generator().manual_seed(8)
    head = make_head("granite_scale", 32, 200, torch.float32, gen)
    hidden, targets = make_inputs(2, 5, 32, 200, 0, torch.float32, gen)
    with pytest.raises(RuntimeError, match=r"at most k=64.*'triton-chunked'"):
        lens_stats(hidden, head, targets, LensRequest(k=65), hidden[-1], impl="triton-fused")


@pytest.mark.parametrize("max_fold_k", [64, 0], ids=["fold-top-k", "torch-top-k"])
def test_chunked_large_k_and_token_blocks(max_fold_k):
    """k = 70 (above the fold kernel's register state by default: top-k per chunk in torch) and,
    with ``max_fold_k`` 0, a small k through the same path; one token per GEMM block."""
    gen = torch.Generator().manual_seed(11)
    head = make_head("padded_vocab", 24, 200, torch.float16, gen)
    hidden, targets = make_inputs(3, 9, 24, 200, 1, torch.float16, gen)
    for k in (70, 3):
        request = LensRequest(k=k, token_sets=token_sets(200))
        config = dataclasses.replace(SMALL_CHUNKED, max_fold_k=max_fold_k, rows_per_gemm=3)
        got = lens_stats_chunked(hidden, head, targets, request, hidden[-1], config=config)
        want, xs, staged_head = staged_oracle(hidden, head, targets, request, hidden[-1])
        assert_tight(got, want, xs, staged_head, targets, got.finite)
        # Token blocks of one token vs the default blocks: the same statistics.
        whole = lens_stats_chunked(hidden, head, targets, request, hidden[-1])
        for name in FLOAT_FIELDS:
            torch.testing.assert_close(
                getattr(got, name), getattr(whole, name), atol=2e-5, rtol=0, equal_nan=True
            )
        assert torch.equal(got.topk_ids, whole.topk_ids)


@pytest.mark.parametrize(
    "n_layers,shared,slots_per_token",
    [(29, True, 32), (13, True, 16), (33, True, 40), (4, False, 8), (1, True, 1), (5, None, 5)],
)
def test_slot_layout_covers_every_row_once(n_layers, shared, slots_per_token):
    kl = shared is not None
    layout = _plan_layout(n_layers, 128, kl, bool(shared))
    assert layout.groups * layout.lb == slots_per_token
    T, t0 = 70, 3
    layer, token, kind, out_slot, final_slot = _slot_maps(layout, n_layers, t0, t0 + T, 128, "cpu")
    assert kind.shape[0] % 128 == 0
    flat = out_slot.flatten()
    assert flat.unique().numel() == flat.numel()  # one slot per output row
    tokens = torch.arange(t0, t0 + T).expand(n_layers, T)
    assert torch.equal(token[out_slot], tokens)
    if not (kl and shared):
        assert torch.equal(layer[out_slot], torch.arange(n_layers)[:, None].expand(-1, T))
        assert (kind[out_slot] == 1).all()
    if kl:
        # Every output row's reference is its own token's final-layer row.
        assert torch.equal(token[final_slot], tokens)
        want_kind = 1 if shared else 2
        assert (kind[final_slot] == want_kind).all()
        if shared:
            assert (layer[final_slot] == n_layers - 1).all()


@pytest.mark.parametrize("impl", ["torch", "triton-fused", "triton-chunked"])
def test_dispatch_passes_the_precision(impl):
    """``lens_stats(precision=...)`` (the job's ``lens.precision``) reaches each implementation:
    with a bf16 head, "fp32" keeps the rows unrounded in the Triton strategies (other logits than
    "model"); the torch path off the GPU multiplies in fp32 either way. A bad value is refused
    by each, naming the choices."""
    gen = torch.Generator().manual_seed(8)
    head = make_head("granite_scale", 32, 200, torch.bfloat16, gen)
    hidden, targets = make_inputs(2, 5, 32, 200, 0, torch.bfloat16, gen)
    request = LensRequest(k=2)
    fp32, _ = lens_stats(hidden, head, targets, request, hidden[-1], impl=impl, precision="fp32")
    model, _ = lens_stats(hidden, head, targets, request, hidden[-1], impl=impl)
    direct = {
        "torch": lens_stats_torch,
        "triton-fused": lens_stats_triton,
        "triton-chunked": lens_stats_chunked,
    }[impl]
    ref = direct(hidden, head, targets, request, hidden[-1], precision="fp32")
    assert torch.equal(fp32.lse, ref.lse) and torch.equal(fp32.topk_ids, ref.topk_ids)
    assert torch.equal(fp32.lse, model.lse) == (impl == "torch")
    with pytest.raises(ValueError, match="precision must be one of"):
        lens_stats(hidden, head, targets, request, hidden[-1], impl=impl, precision="tf32")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_rejects_bad_arguments(strategy):
    fn = globals()[STRATEGIES[strategy][0]]
    gen = torch.Generator().manual_seed(9)
    head = make_head("layernorm_bias", 16, 64, torch.float32, gen)
    hidden, targets = make_inputs(2, 3, 16, 64, 0, torch.float32, gen)
    request = LensRequest(k=2, kl_final=False)
    with pytest.raises(ValueError, match="precision"):
        fn(hidden, head, targets, request, precision="tf32")
    with pytest.raises(ValueError, match="targets"):
        fn(hidden, head, targets[:2], request)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        fn(hidden.double(), head, targets, request)
    with pytest.raises(ValueError, match="rows must be"):
        normalized_rows(hidden, head)
    with pytest.raises(ValueError, match="power of two"):
        LensTritonConfig(block_m=24)
    with pytest.raises(ValueError, match="epilogue_subtiles must be 1 or 2"):
        LensTritonConfig(block_n=16, epilogue_subtiles=2)
    with pytest.raises(ValueError, match="fold_block_v must be a power of two"):
        LensChunkedConfig(fold_block_v=100)


@pytest.mark.parametrize("impl", ["triton-fused", "triton-chunked"])
def test_codelens_run_with_each_strategy_matches_the_torch_run(
    tiny_model_dir, tmp_path, write_corpus, job_file, assert_same_rows, impl
):
    """End to end through the CLI: the same job with a Triton strategy and with impl torch."""
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from codelens.workers.cli import app

    src = write_corpus(tmp_path / "src", {"a.py": "def f(x):\n    return x * 2\n\nprint(f(21))\n"})
    runs = {}
    for name in ("torch", impl):
        job = job_file(
            tmp_path / f"{name}.yaml",
            tiny_model_dir("llama"),
            src,
            tmp_path / name,
            tokens={"window": 64, "overlap": 8},
            lens={"k": 4, "impl": name, "token_sets": {"kw": ["def", "return"]}},
            execution={"batch_tokens": 64},
        )
        result = CliRunner().invoke(app, ["run", str(job)])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / name / "job.json").read_text())["resolved"]["impl"] == name
        runs[name] = pq.read_table(tmp_path / name / "lens")
    assert runs["torch"].num_rows > 0
    # fp32 model: both at fp32 accuracy (float columns within 1e-4, the others equal)
    assert_same_rows(runs["torch"], runs[impl], atol=1e-4)
