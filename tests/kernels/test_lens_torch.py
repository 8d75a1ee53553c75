"""The vocab-chunked torch lens against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from codelens.kernels import (
    FinalNorm,
    Head,
    LensImpl,
    LensRequest,
    NormKind,
    lens_stats,
    lens_stats_naive,
    lens_stats_torch,
    resolve_impl,
)
from codelens.kernels.lens_torch import chunk_topk, default_budget_bytes, pack_keys, unpack_keys

FLOAT_FIELDS = (
    "lse",
    "entropy",
    "kl_final",
    "target_logprob",
    "topk_logprobs",
    "ahead_logprob",
    "set_logmass",
)


def make_head(kind: str, d: int, V: int, *, gen: torch.Generator, dtype=torch.float32) -> Head:
    w = torch.randn(V, d, generator=gen) * 0.6
    w[V // 2] = w[3]  # a planted duplicate row: its logits tie with row 3's up to rounding
    norm_w = 1 + 0.3 * torch.randn(d, generator=gen)
    if kind == "layernorm_bias":
        norm = FinalNorm(NormKind.LAYER, norm_w, 0.2 * torch.randn(d, generator=gen), 1e-5)
        return Head(norm, w.to(dtype), 0.5 * torch.randn(V, generator=gen))
    if kind == "rms":
        return Head(FinalNorm(NormKind.RMS, norm_w, None, 1e-6), w.to(dtype))
    if kind == "gemma_softcap":
        norm = FinalNorm(
            NormKind.RMS, 0.3 * torch.randn(d, generator=gen), None, 1e-6, weight_offset=1.0
        )
        return Head(norm, w.to(dtype), softcap=4.0)
    if kind == "granite_scale":
        return Head(FinalNorm(NormKind.RMS, norm_w, None, 1e-5), w.to(dtype), logit_scale=0.25)
    raise ValueError(kind)


def near_tie_mask(
    hidden: torch.Tensor, head: Head, targets: torch.Tensor, rel: float = 1e-5
) -> torch.Tensor:
    """[L, T, C] True where another logit lies within a rounding step of the target's."""
    z = head.logits(hidden.double(), torch.float64)
    zt = z.gather(-1, targets.clamp_min(0).expand(z.shape[0], -1, -1))
    close = (z[..., None, :] - zt[..., None]).abs() <= rel * (1 + zt.abs()[..., None])
    return (close.sum(-1) > 1) & (targets >= 0)


def assert_matches_oracle(got, want, hidden, head, targets, atol):
    finite = want.finite
    for name in FLOAT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        a, b = a[finite], b[finite]
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.isneginf(), b.isneginf()), name
        ok = a.isfinite() & b.isfinite()
        err = (a[ok] - b[ok]).abs().max().item() if ok.any() else 0.0
        assert err <= atol, f"{name}: max error {err:.3g} > {atol:.3g}"
    ties = near_tie_mask(hidden, head, targets)
    ranks = torch.cat([got.target_rank[..., None], got.ahead_rank], -1)
    want_ranks = torch.cat([want.target_rank[..., None], want.ahead_rank], -1)
    keep = ~ties & finite[..., None]
    assert torch.equal(ranks[keep], want_ranks[keep])
    valid = (targets >= 0).expand_as(ties)
    assert ties.sum() <= 0.1 * valid.sum(), "too many near-ties for the rank check to mean anything"
    # Top-k: the log-probs at the returned ids must be the oracle's k largest.
    logp = torch.log_softmax(head.logits(hidden.double(), torch.float64), -1)
    at_ids = logp.gather(-1, got.topk_ids.long().clamp_min(0))
    assert (at_ids[finite] - want.topk_logprobs[finite].double()).abs().max() <= atol


@pytest.mark.parametrize("kind", ["layernorm_bias", "rms", "gemma_softcap", "granite_scale"])
@pytest.mark.parametrize(
    "L,T,d,V,k,chunk",
    [
        (3, 37, 24, 1003, 5, 128),
        (2, 5, 16, 257, 1, 257),
        (4, 19, 32, 600, 4, 37),
        (1, 1, 8, 50, 50, 7),
    ],
)
def test_torch_path_matches_float64_oracle(kind, L, T, d, V, k, chunk):
    gen = torch.Generator().manual_seed(L * 1000 + V)
    head = make_head(kind, d, V, gen=gen)
    hidden = torch.randn(L, T, d, generator=gen) * 2
    targets = torch.randint(0, V, (T, 3), generator=gen)
    targets[-1, :] = -1  # the document's last token: no target, no look-ahead
    if T > 1:
        targets[-2, 1:] = -1
    request = LensRequest(
        k=k,
        token_sets=(
            ("some", torch.tensor([0, 3, V // 2, V - 1])),
            ("empty", torch.tensor([], dtype=torch.long)),
        ),
    )
    want = lens_stats_naive(hidden, head, targets, request, hidden[-1])
    got = lens_stats_torch(hidden, head, targets, request, hidden[-1], vocab_chunk=chunk)
    assert_matches_oracle(got, want, hidden, head, targets, atol=1e-4)
    assert (got.kl_final[-1] == 0).all(), "KL to the final layer is exactly 0 at the final layer"
    assert (got.target_rank[:, -1] == -1).all() and got.target_logprob[:, -1].isnan().all()
    assert got.set_logmass[..., 1].isneginf().all()


def test_separate_final_rows_match_shared_storage():
    gen = torch.Generator().manual_seed(1)
    head = make_head("rms", 16, 300, gen=gen)
    hidden = torch.randn(3, 11, 16, generator=gen)
    targets = torch.randint(0, 300, (11, 1), generator=gen)
    request = LensRequest(k=3)
    shared = lens_stats_torch(hidden, head, targets, request, hidden[-1], vocab_chunk=64)
    separate = lens_stats_torch(hidden, head, targets, request, hidden[-1].clone(), vocab_chunk=64)
    torch.testing.assert_close(shared.kl_final, separate.kl_final, atol=1e-5, rtol=1e-6)
    want = lens_stats_naive(hidden, head, targets, request, hidden[-1])
    torch.testing.assert_close(separate.kl_final, want.kl_final, atol=1e-5, rtol=0)


def test_exact_ties_break_to_the_smaller_id():
    # Norm weight 0 and an integer bias make the normalised row an exact integer vector, and
    # integer W rows make every logit exact: duplicated rows tie bitwise.
    d, V = 8, 40
    w = torch.randint(-3, 4, (V, d)).float()
    w[31] = w[2]
    w[17] = w[2]
    w[5] = w[9]
    norm = FinalNorm(NormKind.LAYER, torch.zeros(d), torch.randint(-2, 3, (d,)).float(), 1e-5)
    head = Head(norm, w)
    hidden = torch.randn(2, 3, d)
    targets = torch.full((3, 1), 17)
    got = lens_stats_torch(
        hidden, head, targets, LensRequest(k=V), None if False else hidden[-1], vocab_chunk=6
    )
    z = head.logits(hidden[0, 0])
    # Sort by (value desc, id asc) explicitly.
    expected = sorted(range(V), key=lambda v: (-z[v].item(), v))
    assert got.topk_ids[0, 0].tolist() == expected
    # Rank counts strictly greater logits: ids 2 and 31 tie with the target 17 and do not count.
    assert got.target_rank[0, 0].item() == int((z > z[17]).sum())


def test_nonfinite_rows_are_flagged_not_garbage():
    gen = torch.Generator().manual_seed(2)
    head = make_head("rms", 16, 100, gen=gen)
    hidden = torch.randn(2, 6, 16, generator=gen)
    hidden[0, 2, 5] = torch.inf
    hidden[1, 4, 0] = torch.nan
    targets = torch.randint(0, 100, (6, 2), generator=gen)
    got = lens_stats_torch(hidden, head, targets, LensRequest(k=3), hidden[-1])
    assert got.finite.tolist() == [
        [True, True, False, True, True, True],
        [True] * 4 + [False, True],
    ]
    assert (
        got.lse[0, 2].isnan() and got.target_rank[0, 2] == -1 and (got.topk_ids[0, 2] == -1).all()
    )
    # Other rows are unaffected by the bad ones.
    clean = hidden.clone()
    clean[0, 2] = 0
    clean[1, 4] = 0
    ref = lens_stats_torch(clean, head, targets, LensRequest(k=3), clean[-1])
    ok = got.finite.clone()
    ok[:, 4] = False  # token 4's final row is bad, so its KL is undefined at every layer
    torch.testing.assert_close(got.lse[got.finite], ref.lse[got.finite])
    torch.testing.assert_close(got.kl_final[ok], ref.kl_final[ok])


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-4), (torch.float16, 1e-4)])
def test_half_inputs_are_computed_in_fp32(dtype, atol):
    gen = torch.Generator().manual_seed(3)
    head = make_head("layernorm_bias", 24, 500, gen=gen, dtype=dtype)
    hidden = (torch.randn(3, 9, 24, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, 500, (9, 2), generator=gen)
    request = LensRequest(k=4)
    # The oracle reads the same half-precision values, so only fp32 accumulation error remains.
    want = lens_stats_naive(hidden, head, targets, request, hidden[-1])
    got = lens_stats_torch(hidden, head, targets, request, hidden[-1], vocab_chunk=128)
    assert_matches_oracle(got, want, hidden, head, targets, atol=atol)


def test_working_memory_is_bounded_by_the_budget(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    head = make_head("rms", 16, 4000, gen=gen)
    hidden = torch.randn(5, 300, 16, generator=gen)
    targets = torch.randint(0, 4000, (300, 1), generator=gen)
    seen = []
    original = Head.postprocess

    def spy(self, z, bias=None):
        seen.append(z.numel())
        return original(self, z, bias)

    monkeypatch.setattr(Head, "postprocess", spy)
    budget = 1 << 20
    lens_stats_torch(
        hidden, head, targets, LensRequest(k=5), hidden[-1], vocab_chunk=512, budget_bytes=budget
    )
    # Largest logits block: (L + 1) layers' rows of one token block times one vocab chunk.
    assert max(seen) * 24 <= budget
    assert max(seen) < hidden.shape[0] * hidden.shape[1] * head.vocab_size / 20


def test_packed_keys_round_trip_and_order():
    z = torch.tensor([[1.5, -2.0, 1.5, 0.0, -0.0, float("-inf"), 3.25e-20, -7e30]])
    keys = pack_keys(z, first_id=10)
    values, ids = unpack_keys(keys)
    assert torch.equal(ids, torch.arange(10, 18)[None])
    assert torch.equal(values, z + 0.0)
    order = keys.sort(descending=True).values
    assert unpack_keys(order)[1].tolist() == [[10, 12, 16, 13, 14, 11, 17, 15]]


def test_dispatch_auto_is_torch_on_cpu_and_triton_refuses_without_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_impl("auto", "cpu") is LensImpl.TORCH
    with pytest.raises(RuntimeError, match="cannot run"):
        resolve_impl("triton", "cpu")
    gen = torch.Generator().manual_seed(5)
    head = make_head("rms", 8, 20, gen=gen)
    h = torch.randn(1, 2, 8)
    stats, impl = lens_stats(
        h, head, torch.zeros(2, 1, dtype=torch.long), LensRequest(k=2, kl_final=False)
    )
    assert impl is LensImpl.TORCH and stats.entropy is not None and stats.kl_final is None


@pytest.mark.parametrize("precision,inside", [("fp32", "highest"), ("model", "high")])
def test_fp32_precision_holds_matmuls_to_ieee_whatever_the_process_set(
    monkeypatch, precision, inside
):
    """A process that let torch take TF32 for fp32 matmuls (``set_float32_matmul_precision``)
    still gets IEEE fp32 products with ``precision="fp32"``; "model" leaves its choice alone; the
    setting is restored after the call."""
    from codelens.kernels import lens_torch

    seen = []
    real = lens_torch.matmul_fp32

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real(*args, **kwargs)

    monkeypatch.setattr(lens_torch, "matmul_fp32", spy)
    gen = torch.Generator().manual_seed(7)
    head = make_head("rms", 8, 20, gen=gen)
    h = torch.randn(2, 3, 8, generator=gen)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        request = LensRequest(k=2)
        lens_stats_torch(
            h, head, torch.zeros(3, 1, dtype=torch.long), request, h[-1], precision=precision
        )
        assert seen and set(seen) == {inside}
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(k=0), "k must be"),
        (dict(k=30), "larger than the vocabulary"),
        (dict(targets=torch.full((2, 1), 99)), "targets must be in"),
        (dict(final=None), "kl_final needs final_hidden"),
    ],
)
def test_bad_arguments_are_named(bad, match):
    gen = torch.Generator().manual_seed(6)
    head = make_head("rms", 8, 20, gen=gen)
    h = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match=match):
        request = LensRequest(k=bad.get("k", 2))
        lens_stats_torch(
            h,
            head,
            bad.get("targets", torch.zeros(2, 1, dtype=torch.long)),
            request,
            bad.get("final", h[-1]),
        )


@pytest.mark.parametrize("sync_free", [False, True])
def test_chunk_topk_breaks_ties_by_the_smaller_id_either_way(sync_free):
    """The CPU path (float top-k, packed keys only for tied rows) and the sync-free path used on
    GPUs (packed keys for every row) select the same exact top-k set, boundary ties included
    (the order inside the set is fixed later, by the merge)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(0, 6, (7, 40), generator=gen).float()  # many exact ties
    z[2] = 1.0  # a row of one value: the k smallest ids win
    values, ids = chunk_topk(z, 5, 100, sync_free=sync_free)
    for row in range(7):
        best = sorted(range(40), key=lambda i: (-z[row, i].item(), i))[:5]
        assert sorted(ids[row].tolist()) == sorted(100 + i for i in best), row
        assert sorted(values[row].tolist()) == sorted(z[row, best].tolist()), row


def test_the_working_memory_bound_follows_the_device():
    assert default_budget_bytes(torch.device("cpu")) == 256 << 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_torch_path_never_waits_for_a_cuda_device(device_reads):
    """With the targets and token sets on the host (as the pipeline passes them) and sync
    debugging set to error for the whole call, any wait for the device raises: the input checks
    read the host copies, the set ids go up without blocking, the chunk loop reads nothing back."""
    gen = torch.Generator().manual_seed(0)
    head = device_reads.on_device(make_head("rms", 64, 5000, gen=gen))
    hidden = device_reads.on_device(torch.randn(4, 33, 64, generator=gen))
    targets = torch.randint(0, 5000, (33, 3), generator=gen)
    request = LensRequest(k=7, token_sets=(("s", torch.tensor([3, 4999])),))
    lens_stats_torch(hidden, head, targets, request, hidden[-1], vocab_chunk=1024)  # warm-up
    with device_reads.forbidden():
        stats = lens_stats_torch(hidden, head, targets, request, hidden[-1], vocab_chunk=1024)
    assert torch.isfinite(stats.lse).all()
