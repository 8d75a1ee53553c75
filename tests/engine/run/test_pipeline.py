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
