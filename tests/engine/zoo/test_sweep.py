"""The architecture sweep: every causal LM of the installed transformers, with a verdict and why."""

from __future__ import annotations

from codelens.engine.zoo.sweep import sweep_architectures
from codelens.engine.zoo.tiny_models import MODERN_FAMILIES, MULTIMODAL_FAMILIES, TINY_FAMILIES


def test_every_causal_lm_gets_a_verdict_and_every_refusal_a_reason():
    rows = sweep_architectures()
    by_type = {r.model_type: r for r in rows}
    assert len(by_type) == len(rows) > 100, "one row per causal-LM model_type"
    assert {r.state for r in rows} <= {"table", "rule", "refused", "not built"}
    for family in TINY_FAMILIES:
        assert by_type[family].state == "table", by_type[family]
    for family in MODERN_FAMILIES + MULTIMODAL_FAMILIES:
        assert by_type[family].state == "rule", by_type[family]
    for r in rows:
        if r.state == "refused":
            # The surgery module's or the self-check's own words, naming the class and the part.
            assert r.reason.startswith(r.model_class) and len(r.reason) > len(r.model_class) + 20
        elif r.state == "not built":
            assert r.reason.split(":")[0] in (
                "tiny config",
                "tiny model",
                "forward",
                "composite config",
                "the generic tiny config has",
            ) or r.reason.startswith("the generic tiny config has"), r
        else:
            assert r.reason.split(",")[0].split(" (")[0] in ("layernorm", "rmsnorm"), r
