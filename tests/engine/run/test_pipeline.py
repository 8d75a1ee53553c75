"""The lens pipeline (engine/run/pipeline.py): no forward work the lens does not read."""

from __future__ import annotations

import numpy as np
import pytest

from codelens.engine.run.pipeline import LensPipeline, TextInput
from codelens.engine.run.request import resolve_lens
from codelens.engine.schemas import LensSpec


def test_the_model_lm_head_never_runs(tiny_loaded_model, tiny_family):
    loaded = tiny_loaded_model(tiny_family)
    assert loaded.parts.backbone is not None, "every supported family has a backbone"
    calls = []
    handle = loaded.model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        lens = resolve_lens(LensSpec(k=3, lookahead=[2]), loaded)
        ids = loaded.tokenizer("def f(x):\n    return x + 1\n", add_special_tokens=False)
        batch = LensPipeline(loaded, lens)([TextInput.of(ids["input_ids"], (2,), None)])
    finally:
        handle.remove()
    assert calls == [], "the [tokens, V] logits of the model's own head are not computed"
    assert np.isfinite(batch.stats.lse.numpy()).all()


def test_an_out_of_memory_batch_is_split_and_retried(
    tiny_model_dir, tmp_path, write_corpus, job_spec, read_rows, read_manifest, monkeypatch
):
    """Injected CUDA OOM for batches above 160 padded tokens: same rows, smaller batches, and the
    manifest records the batch size each shard ran at."""
    import torch

    from codelens.engine.run.pipeline import LensPipeline
    from codelens.engine.run.runner import ShardRunner
    from codelens.workers.job import run_job

    files = {f"m{i}.py": f"def f{i}(x):\n    return x * {i} + {i}\n" * 8 for i in range(4)}
    corpus = write_corpus(tmp_path / "corpus", files)
    settings = dict(tokens={"window": 40, "overlap": 4}, execution={"batch_tokens": 512})
    model = tiny_model_dir("llama")
    run_job(job_spec(model, corpus, tmp_path / "plain", **settings), show_progress=False)

    original, seen = LensPipeline.launch, []

    def small_device(self, inputs):
        padded = len(inputs) * max(len(x.input_ids) for x in inputs)
        seen.append(padded)
        if padded > 160:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, inputs)

    monkeypatch.setattr(LensPipeline, "launch", small_device)
    splits = []
    original_shrink = ShardRunner._shrink
    monkeypatch.setattr(
        ShardRunner, "_shrink", lambda self, i: (splits.append(len(i)), original_shrink(self, i))
    )
    run_job(job_spec(model, corpus, tmp_path / "split", **settings), show_progress=False)
    assert splits and max(seen) > 160 and min(seen) <= 160
    plain, split = read_rows(tmp_path / "plain"), read_rows(tmp_path / "split")
    for name in ("doc", "pos", "layer", "token_id", "target_rank"):
        np.testing.assert_array_equal(plain[name], split[name], err_msg=name)
    np.testing.assert_allclose(split["target_logprob"], plain["target_logprob"], atol=1e-5)
    assert {e["batch_tokens"] for e in read_manifest(tmp_path / "plain")} == {512}
    ran_at = [e["batch_tokens"] for e in read_manifest(tmp_path / "split")]
    assert all(b <= 160 for b in ran_at), ran_at  # shrunk at the first shard, for every later one


def test_one_window_that_does_not_fit_is_a_real_failure(tiny_loaded_model, monkeypatch):
    import pytest
    import torch

    from codelens.engine.data.windows import Shard, WindowTask
    from codelens.engine.run.runner import ShardRunner

    loaded = tiny_loaded_model("llama")
    runner = ShardRunner(LensSpec(k=2, lookahead=[]), loaded, batch_tokens=64)

    def no_memory(self, inputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(LensPipeline, "launch", no_memory)
    window = WindowTask(0, (1, 2, 3), 0, np.array([[2], [3], [-1]], dtype=np.int32))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        runner.compute(Shard(0, (window,), 3))


def test_windows_are_batched_by_length_and_come_back_in_window_order(
    tiny_loaded_model, monkeypatch
):
    """A shard of long and short windows, interleaved: batches of similar lengths are computed
    (less padding than batching them in window order), and the statistics are those of each
    window run alone, in window order."""
    import torch

    from codelens.engine.data.windows import Shard, WindowTask
    from codelens.engine.run.runner import ShardRunner, batches

    loaded = tiny_loaded_model("llama")
    rng = np.random.default_rng(0)
    lengths = [40, 6, 38, 9, 40, 5, 33, 12]
    windows = tuple(
        WindowTask(
            doc,
            tuple(int(t) for t in rng.integers(3, 200, n)),
            0,
            np.stack([rng.integers(3, 200, n), np.full(n, -1)], axis=1).astype(np.int32),
        )
        for doc, n in enumerate(lengths)
    )
    runner = ShardRunner(LensSpec(k=3, lookahead=[2]), loaded, batch_tokens=84)
    original, padded = LensPipeline.launch, []

    def counting(self, inputs):
        padded.append(len(inputs) * max(len(x.input_ids) for x in inputs))
        return original(self, inputs)

    monkeypatch.setattr(LensPipeline, "launch", counting)
    batch = runner.compute(Shard(0, windows, sum(lengths))).assembled()
    in_window_order = sum(len(b) * max(len(w.input_ids) for w in b) for b in batches(windows, 84))
    assert sum(padded) < in_window_order, (padded, in_window_order)

    assert [x.doc for x in batch.inputs] == list(range(len(windows)))
    alone = [runner.pipeline([w]) for w in windows]
    assert torch.equal(batch.token_ids, torch.cat([a.token_ids for a in alone]))
    assert torch.equal(batch.targets, torch.cat([a.targets for a in alone]))
    for name in ("lse", "target_logprob", "topk_logprobs", "ahead_logprob"):
        expected = torch.cat([getattr(a.stats, name) for a in alone], dim=1)
        torch.testing.assert_close(
            getattr(batch.stats, name), expected, atol=1e-5, rtol=0, equal_nan=True
        )
    np.testing.assert_array_equal(
        batch.stats.target_rank.numpy(),
        torch.cat([a.stats.target_rank for a in alone], dim=1).numpy(),
    )


def _triton_or_skip():
    import os

    import pytest
    import torch

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


@pytest.mark.parametrize("impl", ["triton-fused", "triton-chunked"])
def test_the_lens_implementation_is_proven_against_the_torch_path_at_load(tiny_loaded_model, impl):
    from codelens.engine.run.runner import ShardRunner

    _triton_or_skip()
    loaded = tiny_loaded_model("llama")
    spec = LensSpec(k=3, lookahead=[2], token_sets={"low_ids": [1, 2, 3, 4]}, impl=impl)
    runner = ShardRunner(spec, loaded, batch_tokens=256)
    assert 0.0 <= runner.impl_check_max_abs_err < 1e-3
    torch_runner = ShardRunner(LensSpec(k=3, lookahead=[2], impl="torch"), loaded, batch_tokens=256)
    assert torch_runner.impl_check_max_abs_err == 0.0  # nothing to prove against itself


def test_lens_precision_fp32_is_proven_within_the_fp32_bound(tiny_loaded_model):
    """lens.precision fp32 on a bf16 model: the kernels keep the rows unrounded, as the torch
    path does, so the load-time check holds them to the fp32 bound; in "model" precision the
    kernels round the rows to bf16 (as the model's head does) and differ by far more."""
    from codelens.engine.run.pipeline import IMPL_CHECK_TOLERANCE_NATS
    from codelens.engine.run.runner import ShardRunner

    _triton_or_skip()
    loaded = tiny_loaded_model("llama", "bfloat16")
    fp32 = ShardRunner(
        LensSpec(k=3, lookahead=[2], precision="fp32", impl="triton-chunked"),
        loaded,
        batch_tokens=256,
    )
    assert fp32.impl_check_max_abs_err <= IMPL_CHECK_TOLERANCE_NATS[True]
    model = ShardRunner(
        LensSpec(k=3, lookahead=[2], impl="triton-chunked"), loaded, batch_tokens=256
    )
    assert model.impl_check_max_abs_err > 10 * fp32.impl_check_max_abs_err


@pytest.mark.parametrize(
    "impl, statistic",
    [
        ("triton", "lse"),
        ("triton-fused", "lse"),
        ("triton-chunked", "lse"),
        ("triton-fused", "ahead_logprob"),
        ("triton-chunked", "set_logmass"),
    ],
)
def test_an_implementation_that_disagrees_with_the_torch_path_is_refused(
    tiny_loaded_model, monkeypatch, impl, statistic
):
    """A kernel whose statistic is off by 0.01 nats (as a broken build would be: its log-sum-exp,
    a look-ahead threshold, a token set's sum) never runs a shard: the job stops at load with the
    difference and the fix."""
    import dataclasses

    import pytest

    from codelens.engine.errors import SelfCheckError
    from codelens.engine.run import pipeline
    from codelens.engine.run.runner import ShardRunner
    from codelens.kernels import LensImpl

    _triton_or_skip()
    real = pipeline.lens_stats

    def off_by_a_little(*args, impl, **kwargs):
        stats, chosen = real(*args, impl=impl, **kwargs)
        if impl is not LensImpl.TORCH:
            stats = dataclasses.replace(stats, **{statistic: getattr(stats, statistic) + 0.01})
        return stats, chosen

    monkeypatch.setattr(pipeline, "lens_stats", off_by_a_little)
    spec = LensSpec(k=3, lookahead=[2], token_sets={"low_ids": [1, 2, 3, 4]}, impl=impl)
    loaded = tiny_loaded_model("llama")
    # 'triton' is named as the strategy it resolved to.
    ran = resolve_lens(spec, loaded).impl.value
    assert ran != "triton" and (ran == impl or impl == "triton")
    with pytest.raises(SelfCheckError, match=rf"lens.impl '{ran}' differs from the torch path by"):
        ShardRunner(spec, loaded, batch_tokens=256)


def test_an_implementation_that_cannot_run_here_stops_the_job_at_load(
    tiny_loaded_model, monkeypatch
):
    """A Triton strategy that raises on the probe batch (here: no C compiler for Triton's
    launcher, as on a GPU machine without gcc) stops the job before any shard with its reason and
    the fix, not a traceback from inside Triton."""
    import pytest

    from codelens.engine.errors import SelfCheckError
    from codelens.engine.run import pipeline
    from codelens.engine.run.runner import ShardRunner
    from codelens.kernels import LensImpl

    _triton_or_skip()
    real = pipeline.lens_stats

    def no_compiler(*args, impl, **kwargs):
        if impl is not LensImpl.TORCH:
            raise RuntimeError(
                "Failed to find C compiler. Please specify via CC environment variable.\nmore"
            )
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(pipeline, "lens_stats", no_compiler)
    spec = LensSpec(k=3, lookahead=[2], impl="triton-chunked")
    with pytest.raises(SelfCheckError) as caught:
        ShardRunner(spec, tiny_loaded_model("llama"), batch_tokens=256)
    message = str(caught.value)
    assert "lens.impl 'triton-chunked' failed on a probe batch" in message
    assert "RuntimeError: Failed to find C compiler. Please specify via CC" in message
    assert "set lens.impl: torch" in message and "more" not in message


def test_batches_are_assembled_in_window_order_one_run_at_a_time():
    """``LensBatch.assemble``: the inputs of several batches put in any order, each input's token
    run moved whole with every per-token tensor (statistics along dimension 1, token ids and
    targets along 0, router choices along 1), as a concatenation then a gather by token would."""
    import dataclasses

    import torch

    from codelens.engine.run.pipeline import LensBatch
    from codelens.kernels import LensStats

    gen = torch.Generator().manual_seed(0)
    lengths = [[3, 1], [4], [2, 5, 1]]  # tokens of each input, batch by batch
    batches = []
    for sizes in lengths:
        n = sum(sizes)
        stats = {
            f.name: torch.randn(4, n, 3, generator=gen) if f.name.startswith("topk") else None
            for f in dataclasses.fields(LensStats)
        }
        stats |= {name: torch.randn(4, n, generator=gen) for name in ("lse", "target_logprob")}
        inputs = tuple(TextInput(tuple(range(m)), m, np.zeros((m, 1), np.int32)) for m in sizes)
        batches.append(
            LensBatch(
                inputs,
                LensStats(**stats),
                torch.randint(0, 99, (n,), generator=gen),
                torch.randint(0, 99, (n, 2), generator=gen),
                torch.randint(0, 9, (4, n, 2), generator=gen, dtype=torch.int16),
            )
        )
    order = [4, 0, 5, 2, 1, 3]
    got = LensBatch.assemble(batches, order)

    flat = [x for b in batches for x in b.inputs]
    starts = np.cumsum([0] + [x.n_emit for x in flat])
    index = torch.from_numpy(np.concatenate([np.arange(starts[j], starts[j + 1]) for j in order]))
    assert got.inputs == tuple(flat[j] for j in order)
    for name in ("lse", "target_logprob", "topk_ids", "topk_logprobs"):
        whole = torch.cat([getattr(b.stats, name) for b in batches], 1)
        assert torch.equal(getattr(got.stats, name), whole.index_select(1, index)), name
    assert got.stats.entropy is None
    assert torch.equal(got.token_ids, torch.cat([b.token_ids for b in batches])[index])
    assert torch.equal(got.targets, torch.cat([b.targets for b in batches])[index])
    assert torch.equal(got.routed, torch.cat([b.routed for b in batches], 1).index_select(1, index))
    assert LensBatch.assemble(batches[:1]) is batches[0]  # already in order: no copy
    with pytest.raises(ValueError, match="at least one batch"):
        LensBatch.assemble([])
    with pytest.raises(ValueError, match="each of the 6 inputs once"):
        LensBatch.assemble(batches, [4, 0, 5, 2, 1, 1])

    # A shard's batches are assembled once and let go (pinned host memory on a GPU).
    from codelens.engine.run.runner import ShardStats

    shard = ShardStats(tuple(batches), tuple(order))
    first = shard.assembled()
    assert shard.batches == () and shard.assembled() is first
    assert torch.equal(first.stats.lse, got.stats.lse)
