"""The lens pipeline (engine/run/pipeline.py): no forward work the lens does not read."""

from __future__ import annotations

import numpy as np

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
    tiny_model_dir, tmp_path, write_corpus, job_spec, read_rows, monkeypatch
):
    """Injected CUDA OOM for batches above 160 padded tokens: same rows, smaller batches."""
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
