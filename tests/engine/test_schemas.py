"""Job spec loading, validation messages, overrides and the JSON Schema."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from codelens.engine.errors import SpecError
from codelens.engine.schemas import JobSpec, json_schema, load_spec, validate_spec

MINIMAL = {"model": {"path": "m"}, "corpus": {"paths": ["src/*.py"]}}


def test_defaults_follow_the_design():
    spec = validate_spec(MINIMAL)
    assert spec.schema_version == 1
    assert spec.tokens.window == 1024 and spec.tokens.overlap == 128 and spec.tokens.add_bos
    assert spec.lens.layers == "all" and spec.lens.k == 10 and spec.lens.lookahead == [2, 3]
    assert spec.lens.impl == "auto" and spec.execution.backend == "local"
    assert spec.output.shard_tokens == 65536


def test_spec_is_frozen():
    spec = validate_spec(MINIMAL)
    with pytest.raises(ValidationError):
        spec.lens.k = 3


@pytest.mark.parametrize(
    "patch,expected",
    [
        ({"lens": {"kk": 3}}, ["lens.kk: unknown key", "got 3"]),
        ({"model": {"path": "m", "dtype": "int8"}}, ["model.dtype:", "'bfloat16'", "got 'int8'"]),
        ({"lens": {"k": 0}}, ["lens.k:", "greater than or equal to 1", "got 0"]),
        ({"lens": {"layers": [3, 3]}}, ["lens.layers", "must not repeat"]),
        ({"lens": {"lookahead": [1]}}, ["lens.lookahead.0", "greater than or equal to 2"]),
        ({"lens": {"precision": "tf32"}}, ["lens.precision:", "'model' or 'fp32'", "got 'tf32'"]),
        ({"tokens": {"window": 16, "overlap": 15}}, ["tokens:", "overlap (15) must be smaller"]),
        ({"lens": {"token_sets": {"a-b": ["x"]}}}, ["lens.token_sets", "identifier"]),
        ({"lens": {"token_sets": {"js": {}}}}, ["lens.token_sets.js", "keywords: LANG"]),
        (
            {"lens": {"token_sets": {"js": {"keywords": "javascript", "exclusiv": True}}}},
            ["lens.token_sets.js", "exclusiv: unknown key"],
        ),
        ({"execution": {"batch_tokens": 64}}, ["batch_tokens (64) must be at least tokens.window"]),
        ({"schema_version": 2}, ["schema_version", "got 2"]),
        ({"corpus": {"paths": []}}, ["corpus.paths", "at least 1 item"]),
    ],
)
def test_bad_spec_names_the_field_value_and_what_is_allowed(patch, expected):
    data = {**MINIMAL, **patch}
    with pytest.raises(SpecError) as info:
        validate_spec(data)
    for text in expected:
        assert text in str(info.value)


def test_missing_section_is_named():
    with pytest.raises(SpecError, match="model: required field is missing"):
        validate_spec({"corpus": {"paths": ["x"]}})


def test_yaml_and_json_files_with_overrides(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("model: {path: m}\ncorpus: {paths: ['*.py']}\nlens: {k: 4}\n")
    j = tmp_path / "job.json"
    j.write_text(json.dumps(MINIMAL))
    spec = load_spec(
        y, ["lens.k=7", "lens.layers=[0, 2]", "output.dir=out/x", "lens.entropy=false"]
    )
    assert spec.lens.k == 7 and spec.lens.layers == [0, 2] and not spec.lens.entropy
    assert str(spec.output.dir) == "out/x"
    assert load_spec(j).model.path.name == "m"
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        load_spec(y, ["lens.k"])
    with pytest.raises(SpecError, match="lens.nope: unknown key"):
        load_spec(y, ["lens.nope=1"])


def test_unreadable_specs(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(scalar)


def test_fingerprint_ignores_where_and_how_fast():
    a = validate_spec(MINIMAL)
    b = validate_spec(
        {**MINIMAL, "output": {"dir": "elsewhere"}, "execution": {"batch_tokens": 4096}}
    )
    c = validate_spec({**MINIMAL, "lens": {"k": 3}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_json_schema_documents_every_field():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    for name, section in schema["$defs"].items():
        assert section["additionalProperties"] is False, name
        for field, prop in section["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
    assert JobSpec.model_json_schema()["properties"]["schema_version"]["const"] == 1


def test_fingerprint_of_the_lens_precision():
    """fp32 products give other rows, so another job; the default is left out of the hash, as if
    the field were absent (a spec written before lens.precision existed keeps its fingerprint,
    and its run directory still resumes)."""
    default = validate_spec(MINIMAL)
    named = validate_spec({**MINIMAL, "lens": {"precision": "model"}})
    fp32 = validate_spec({**MINIMAL, "lens": {"precision": "fp32"}})
    assert default.fingerprint() == named.fingerprint() != fp32.fingerprint()
