"""The report's examples (engine/analysis/examples.py): each rule's pick against a brute-force
loop over the rows of a real run of the bundled model, and each grid's cells against those rows."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from codelens.engine.analysis.examples import N_COPY_EXAMPLES, RARE_BUCKET, pick_examples
from codelens.engine.model.loading import load_tokenizer
from codelens.engine.zoo.default_model import default_model_dir
from codelens.workers.job import run_job

# Identifiers that come back (rare in this two-file corpus: copying is the only way to get them).
PY = (
    "def frobnicate_widget(zorblax, quuxle):\n"
    "    return zorblax + quuxle\n\n\n"
    "print(frobnicate_widget(zorblax=1, quuxle=2))\n"
    "print(frobnicate_widget(zorblax=3, quuxle=4))\n"
)
C = (
    "#include <stdio.h>\n\nstatic int twice(int x) {\n    return x * 2;\n}\n\n"
    "int main(void) {\n    for (int i = 0; i < 3; i++) {\n"
    '        printf("%d\\n", twice(i));\n    }\n    return 0;\n}\n'
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, write_corpus, job_spec):
    root = tmp_path_factory.mktemp("examples")
    corpus = write_corpus(root / "corpus", {"widget.py": PY, "twice.c": C})
    spec = job_spec(
        default_model_dir(),
        corpus,
        root / "run",
        glob="*",
        lens={
            "k": 3,
            "lookahead": [2, 3],
            "token_sets": {
                "python": {"keywords": "python", "exclusive": True},
                "c": {"keywords": "c", "exclusive": True},
            },
        },
        output={"shard_tokens": 120},  # several part files
    )
    run_job(spec, show_progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def picked(run):
    import json

    summary = json.loads((run / "summary.json").read_text())
    docs = {d["doc"]: d for d in pq.read_table(run / "docs.parquet").to_pylist()}
    tokenizer = load_tokenizer(default_model_dir())
    return pick_examples(run, summary, docs, tokenizer), docs


def _tokens(read_rows, run):
    """{(doc, pos): {layer: row index}} and the rows."""
    rows = read_rows(run, stack=("topk_ids", "topk_logprobs", "ahead_logprob"))
    at: dict[tuple[int, int], dict[int, int]] = {}
    for i, (d, p, layer) in enumerate(zip(rows["doc"], rows["pos"], rows["layer"], strict=True)):
        at.setdefault((int(d), int(p)), {})[int(layer)] = i
    return rows, dict(sorted(at.items()))


def test_each_rule_picks_what_a_loop_over_the_rows_picks(run, picked, read_rows) -> None:
    examples, docs = picked
    rows, at = _tokens(read_rows, run)
    keys = list(at)
    last = max(next(iter(at.values())))
    middle = range(1, last)

    def value(name, key, layer, col=None):
        v = rows[name][at[key][layer]]
        return v if col is None else v[col]

    # copy: rare seen identifiers the output gets right, latest convergence first.
    copies = []
    for key in keys:
        r = at[key][0]
        nxt = (key[0], key[1] + 1)
        if not (rows["target_seen"][r] is True or rows["target_seen"][r] == 1):
            continue
        if not 0 <= rows["target_freq_bucket"][r] <= RARE_BUCKET or nxt not in at:
            continue
        if rows["category"][at[nxt][0]] != "name":
            continue
        top1 = [value("topk_ids", key, layer, 0) for layer in range(last + 1)]
        if top1[-1] != rows["target_id"][r]:
            continue
        conv = 0
        for layer in range(last + 1):
            if top1[layer] != top1[-1]:
                conv = layer + 1
        copies.append((-conv, key))
    want_copy = [key for _, key in sorted(copies)[:N_COPY_EXAMPLES]]

    # detour: largest middle-layer mass minus output mass on a set of another language.
    best = (0.0, None)
    for name in ("set_python", "set_c"):
        for key in keys:
            if docs[key[0]]["language"] == name[4:]:
                continue
            mass = [np.exp(np.float64(value(name, key, layer))) for layer in range(last + 1)]
            gain = max(mass[1:-1]) - mass[-1]
            if gain > best[0]:
                best = (gain, key)
    # lookahead: largest middle-layer log-prob of the token o ahead over the output's.
    ahead = (0.0, None)
    for a in range(2):
        for key in keys:
            lp = [np.float64(value("ahead_logprob", key, layer, a)) for layer in range(last + 1)]
            if np.isnan(lp[-1]):
                continue
            gain = max(lp[layer] for layer in middle) - lp[-1]
            if gain > ahead[0]:
                ahead = (gain, key)

    by_rule = {}
    for ex in examples:
        by_rule.setdefault(ex.rule, []).append(ex)
    assert want_copy, "the bundled model copies at least one rare identifier of widget.py"
    assert [ex.rule for ex in examples] == ["copy"] * len(want_copy) + [
        rule for rule, found in (("detour", best[1]), ("lookahead", ahead[1])) if found is not None
    ]
    picks = {
        "copy": want_copy,
        "detour": [best[1]] if best[1] else [],
        "lookahead": [ahead[1]] if ahead[1] else [],
    }
    for rule, exs in by_rule.items():
        for ex, key in zip(exs, picks[rule], strict=True):
            # The grid's marked column is the picked token, and every cell is that row's value.
            pos0 = key[1] - ex.column
            for c, token in enumerate(ex.grid.token_ids):
                cell_key = (key[0], pos0 + c)
                assert token == rows["token_id"][at[cell_key][0]]
                for li, layer in enumerate(ex.grid.layers):
                    r = at[cell_key][layer]
                    assert ex.grid.top1_ids[li, c] == rows["topk_ids"][r, 0]
                    lp = rows["target_logprob"][r]
                    assert np.isclose(ex.grid.logprob[li, c], lp, equal_nan=True)
            assert ex.look_for.count(".") >= 1 and f"column {ex.column + 1}" in ex.look_for


def test_a_run_without_token_sets_or_lookahead_has_only_copy_examples(
    tmp_path, write_corpus, job_spec
) -> None:
    import json

    corpus = write_corpus(tmp_path / "corpus", {"widget.py": PY})
    spec = job_spec(default_model_dir(), corpus, tmp_path / "run", lens={"lookahead": []})
    run_job(spec, show_progress=False)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    docs = {d["doc"]: d for d in pq.read_table(run / "docs.parquet").to_pylist()}
    examples = pick_examples(run, summary, docs, load_tokenizer(default_model_dir()))
    assert examples and {ex.rule for ex in examples} == {"copy"}
