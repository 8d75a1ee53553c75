"""summary.json against aggregates computed straight from the Parquet rows of a real run, the
mergeable partials, and the README's example queries (run exactly as written there)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from codelens.engine.run.aggregates import (
    RowValues,
    convergence_layers,
    convergence_partial,
    finalize,
    layer_partials,
    merge_partials,
)
from codelens.workers.job import run_job

CORPUS = {
    "app.py": (
        'import os\n\nclass Store:\n    """Keeps   items."""\n\n'
        "    def __init__(self):\n        self.items = []  # the items\n\n"
        "    def add(self, x: int) -> None:\n        if x > 0 and x != 42:\n"
        "            self.items.append(x * 2.5)\n        print(len(self.items), 'added')\n"
    ),
    "util.js": (
        "// helpers\nfunction add(a, b) {\n  return a + b;\n}\nconst s = `x=${add(1, 2)}`;\n"
    ),
    "notes.unknownext": "some plain words\nand more words\n",
    # Repeated lines (one indented differently, one with a trailing space: not a repeat) and
    # identifiers that come back: the copy breakdowns' material.
    "repeat.py": (
        "total = count + 1\nif total:\n    total = count + 1\n    total = count + 1 \n"
        "print(total)\nprint(total)\nzebra_quux = total\n"
    ),
    "empty.py": "  \n",
}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory, write_corpus, job_spec) -> Path:
    root = tmp_path_factory.mktemp("summary")
    spec = job_spec(
        tiny_model_dir("llama"),
        write_corpus(root / "corpus", CORPUS),
        root / "run",
        glob="*",
        name="summary-test",
        tokens={"window": 48, "overlap": 8},
        lens={"k": 3, "lookahead": [2, 3], "token_sets": {"kw": ["def", "return", "self"]}},
        output={"shard_tokens": 50},  # several shards
        execution={"batch_tokens": 128},
    )
    run_job(spec, show_progress=False)
    return root / "run"


def _rows(read_rows, run_dir: Path) -> dict[str, np.ndarray]:
    """The run's rows (list columns as 2-D arrays) and each row's language."""
    out = read_rows(run_dir, stack=("topk_ids", "ahead_rank", "ahead_logprob"))
    docs = {
        d["doc"]: d["language"] or "unknown"
        for d in pq.read_table(run_dir / "docs.parquet").to_pylist()
    }
    out["language"] = np.array([docs[d] for d in out["doc"].tolist()], dtype=object)
    return out


def _check_group(
    entry: dict, rows: dict[str, np.ndarray], sel: np.ndarray, final_top1: np.ndarray
) -> None:
    has = sel & (rows["target_id"] >= 0) & rows["residual_finite"]
    ok = sel & rows["residual_finite"]
    assert entry["rows"] == sel.sum() and entry["count"] == has.sum()
    assert np.isclose(
        entry["mean_target_logprob"], rows["target_logprob"][has].astype(np.float64).mean()
    )
    assert np.isclose(
        entry["top1_accuracy"], (rows["topk_ids"][has, 0] == rows["target_id"][has]).mean()
    )
    assert np.isclose(entry["top10_accuracy"], (rows["target_rank"][has] < 10).mean())
    assert np.isclose(
        entry["top1_agreement_final"], (rows["topk_ids"][ok, 0] == final_top1[ok]).mean()
    )
    assert np.isclose(
        entry["mean_kl_final"], rows["kl_final"][ok].astype(np.float64).mean(), atol=1e-7
    )
    assert np.isclose(entry["mean_entropy"], rows["entropy"][ok].astype(np.float64).mean())
    for a, look in enumerate(entry["lookahead"]):
        there = ok & (rows["ahead_rank"][:, a] >= 0)
        assert look["count"] == there.sum()
        assert np.isclose(look["top1_accuracy"], (rows["ahead_rank"][there, a] == 0).mean())
        assert np.isclose(
            look["mean_logprob"], rows["ahead_logprob"][there, a].astype(np.float64).mean()
        )
    mass = np.exp(rows["set_kw"][ok].astype(np.float64)).mean()
    assert np.isclose(entry["token_set_mean_mass"]["kw"], mass)
    ranks = np.sort(rows["target_rank"][has])
    median = ranks[int(np.ceil(0.5 * len(ranks))) - 1]  # the element the histogram quantile finds
    lo = entry["target_rank_quantiles"]["p50"]
    assert lo <= median < max(1, 2 * lo), "the median rank lies in the reported log2 bin"


def _convergence_from_rows(rows: dict[str, np.ndarray]) -> dict[tuple[int, int], int]:
    """Each token's convergence layer, from the rows alone (a loop, unlike the runner)."""
    by_token: dict[tuple[int, int], dict[int, int]] = {}
    for d, p, layer, top1 in zip(
        rows["doc"], rows["pos"], rows["layer"], rows["topk_ids"][:, 0], strict=True
    ):
        by_token.setdefault((int(d), int(p)), {})[int(layer)] = int(top1)
    out = {}
    for key, per_layer in by_token.items():
        last = max(per_layer)
        conv = 0
        for layer in sorted(per_layer):
            if per_layer[layer] != per_layer[last]:
                conv = layer + 1
        out[key] = conv
    return out


def test_summary_agrees_with_the_rows_overall_by_category_and_language(run_dir, read_rows):
    rows = _rows(read_rows, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    n_layers = int(rows["layer"].max()) + 1
    assert [e["layer"] for e in summary["layers"]] == list(range(n_layers))
    final = {}
    for i in np.flatnonzero(rows["layer"] == n_layers - 1):
        final[rows["doc"][i], rows["pos"][i]] = rows["topk_ids"][i, 0]
    final_top1 = np.array([final[d, p] for d, p in zip(rows["doc"], rows["pos"], strict=True)])
    seen_categories = set()
    for entry in summary["layers"]:
        in_layer = rows["layer"] == entry["layer"]
        _check_group(entry, rows, in_layer, final_top1)
        assert set(entry["by_category"]) == set(rows["category"][in_layer])
        for cat, group in entry["by_category"].items():
            _check_group(group, rows, in_layer & (rows["category"] == cat), final_top1)
            seen_categories.add(cat)
        assert set(entry["by_language"]) == {"python", "javascript", "unknown"}
        for lang, group in entry["by_language"].items():
            _check_group(group, rows, in_layer & (rows["language"] == lang), final_top1)
    assert {"keyword", "name", "string", "comment", "whitespace", "punctuation"} <= seen_categories

    conv = _convergence_from_rows(rows)
    first = rows["layer"] == 0
    token_category = dict(
        zip(
            zip(rows["doc"][first], rows["pos"][first], strict=True),
            rows["category"][first],
            strict=True,
        )
    )
    want = np.bincount(list(conv.values()), minlength=n_layers)
    got = summary["convergence"]
    assert got["layers"] == list(range(n_layers))
    assert got["overall"]["histogram"] == want.tolist() and got["overall"]["tokens"] == len(conv)
    assert np.isclose(got["overall"]["mean_layer"], np.mean(list(conv.values())))
    for cat, hist in got["by_category"].items():
        mine = [c for key, c in conv.items() if token_category[key] == cat]
        assert hist["histogram"] == np.bincount(mine, minlength=n_layers).tolist()
    assert got["undefined_tokens"] == 0


def test_summary_is_the_merge_of_the_manifest_partials_in_any_grouping(run_dir, read_manifest):
    entries = read_manifest(run_dir)
    entries.sort(key=lambda e: e["shard"])
    assert len(entries) >= 3
    summary = json.loads((run_dir / "summary.json").read_text())
    lookahead = [a["offset"] for a in summary["layers"][0]["lookahead"]]
    forward = finalize(merge_partials(e["partials"] for e in entries), lookahead)
    assert (
        forward["layers"] == summary["layers"] and forward["convergence"] == summary["convergence"]
    )
    # Another order changes float sums by rounding only; counts and histograms are exact.
    backward = finalize(merge_partials(e["partials"] for e in reversed(entries)), lookahead)
    assert json.dumps(backward["convergence"]) == json.dumps(forward["convergence"])
    for a, b in zip(backward["layers"], forward["layers"], strict=True):
        assert a["count"] == b["count"] and a["rank_histogram_log2"] == b["rank_histogram_log2"]
        assert np.isclose(a["mean_target_logprob"], b["mean_target_logprob"], rtol=1e-12)
    # The merge does not modify its inputs (a resumed run merges the same lines again).
    again = finalize(merge_partials(e["partials"] for e in entries), lookahead)
    assert again["layers"] == forward["layers"]


def test_convergence_layer_definition():
    # 4 captured layers x 4 tokens; the final layer's top-1 is the last row.
    top1 = torch.tensor([[1, 2, 3, 7], [5, 2, 3, 7], [5, 2, 4, 7], [5, 2, 4, 7]])
    finite = torch.ones_like(top1, dtype=torch.bool)
    assert convergence_layers(top1, finite, [0, 1, 2, 3]).tolist() == [1, 0, 2, 0]
    # With a subset of layers captured, the convergence layer is a captured one.
    assert convergence_layers(top1, finite, [0, 4, 8, 12]).tolist() == [4, 0, 8, 0]
    finite[1, 1] = False  # a non-finite middle row disagrees
    finite[3, 3] = False  # a non-finite final row: undefined
    conv = convergence_layers(top1, finite, [0, 1, 2, 3])
    assert conv.tolist() == [1, 2, 2, -1]
    groups = {"category": (torch.tensor([0, 0, 1, -1]), ["a", "b"])}
    part = convergence_partial(conv, [0, 1, 2, 3], groups)
    assert part == {
        "all": {"0": 0, "1": 1, "2": 2, "3": 0},
        "undefined": 1,
        "by_category": {
            "a": {"0": 0, "1": 1, "2": 1, "3": 0},
            "b": {"0": 0, "1": 0, "2": 1, "3": 0},
        },
    }


def test_partials_merge_exactly_when_a_shard_is_split():
    gen = torch.Generator().manual_seed(0)
    t = 200
    data = dict(
        target_logprob=-torch.rand(t, generator=gen) * 9,
        target_rank=torch.randint(0, 3000, (t,), generator=gen, dtype=torch.int32),
        top1=torch.randint(0, 50, (t,), generator=gen, dtype=torch.int32),
        final_top1=torch.randint(0, 50, (t,), generator=gen, dtype=torch.int32),
        target_id=torch.randint(-1, 50, (t,), generator=gen, dtype=torch.int32),
        finite=torch.rand(t, generator=gen) > 0.05,
        entropy=torch.rand(t, generator=gen) * 5,
        kl_final=None,
        ahead_logprob=-torch.rand(t, 2, generator=gen),
        ahead_rank=torch.randint(-1, 9, (t, 2), generator=gen, dtype=torch.int32),
        set_logmass=-torch.rand(t, 1, generator=gen) * 4,
    )
    cat = torch.randint(-1, 10, (t,), generator=gen)
    lang = torch.randint(0, 2, (t,), generator=gen)

    def part(sl):
        groups = {
            "category": (cat[sl].numpy(), [f"c{i}" for i in range(10)]),
            "language": (lang[sl].numpy(), ["x", "y"]),
        }
        one_layer = {k: None if v is None else v[sl].numpy()[None] for k, v in data.items()}
        final_top1, target_id = one_layer.pop("final_top1")[0], one_layer.pop("target_id")[0]
        rows = RowValues(**one_layer, final_top1=final_top1, target_id=target_id)
        return layer_partials(rows, [0], ["s"], groups)

    whole = finalize(merge_partials([part(slice(None))]), [2, 3])
    split = finalize(merge_partials([part(slice(0, 70)), part(slice(70, None))]), [2, 3])
    assert _close(whole, split), "counts and histograms equal, float sums equal up to rounding"
    assert whole["layers"][0]["mean_kl_final"] is None, "a switched-off statistic stays null"


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-12))
    assert a == b, (a, b)
    return True


def test_readme_queries_give_the_summary_numbers(run_dir, capsys, readme_blocks):
    pytest.importorskip("duckdb")
    pytest.importorskip("polars")
    blocks = readme_blocks("example-queries")
    assert len(blocks) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    namespaces = []
    for block in blocks:
        assert 'run = "runs/demo/run"' in block
        ns: dict = {}
        exec(
            compile(
                block.replace('run = "runs/demo/run"', f"run = {str(run_dir)!r}"),
                "README.md",
                "exec",
            ),
            ns,
        )
        namespaces.append(ns)
    duck, pol = namespaces
    layers = {e["layer"]: e for e in summary["layers"]}

    for layer, cat, tokens, mean_lp, _mean_rank, _median, top1 in duck["by_category"].fetchall():
        want = layers[layer]["by_category"][cat]
        assert tokens == want["count"]
        assert np.isclose(mean_lp, want["mean_target_logprob"]) and np.isclose(
            top1, want["top1_accuracy"]
        )
    for layer, lang, tokens, mean_kl, mean_ent in duck["by_language"].fetchall():
        want = layers[layer]["by_language"][lang]
        assert tokens == want["rows"] - want["nonfinite_rows"]
        assert np.isclose(mean_kl, want["mean_kl_final"], atol=1e-7) and np.isclose(
            mean_ent, want["mean_entropy"]
        )
    conv = summary["convergence"]
    for cat, layer, tokens in duck["convergence"].fetchall():
        assert conv["by_category"][cat]["histogram"][conv["layers"].index(layer)] == tokens
    assert sum(t for *_, t in duck["convergence"].fetchall()) == conv["overall"]["tokens"]

    frame = pol["by_language_category"]
    for (layer, cat), part in frame.group_by("layer", "category"):
        want = layers[layer]["by_category"][cat]
        assert part["tokens"].sum() == want["count"]
        weighted = (part["mean_logprob"] * part["tokens"]).sum() / part["tokens"].sum()
        assert np.isclose(weighted, want["mean_target_logprob"])
    for (layer, lang), part in frame.group_by("layer", "language"):
        want = layers[layer]["by_language"][lang]
        assert part["tokens"].sum() == want["count"]
        assert np.isclose(
            (part["top1_acc"] * part["tokens"]).sum() / part["tokens"].sum(), want["top1_accuracy"]
        )
    # Line 3 of document 0 (app.py), rebuilt from the byte spans.
    joined = "".join(pol["pieces"])
    assert joined and joined in CORPUS["app.py"] and "class Store:" in joined
    printed = capsys.readouterr().out
    assert "convergence_layer" in printed and "'punctuation'" in printed  # .show() and print()


def test_copy_columns_and_breakdowns_agree_with_a_recomputation_from_the_rows(run_dir, read_rows):
    """target_seen, target_freq_bucket and line_repeat from the rows' own token ids and the
    corpus texts; by_seen / by_freq_bucket / by_line_repeat (statistics and convergence) from the
    rows."""
    rows = _rows(read_rows, run_dir)
    docs = {d["doc"]: d for d in pq.read_table(run_dir / "docs.parquet").to_pylist()}
    first = rows["layer"] == 0
    ids: dict[int, dict[int, int]] = {}
    for d, p, t in zip(
        rows["doc"][first], rows["pos"][first], rows["token_id"][first], strict=True
    ):
        ids.setdefault(int(d), {})[int(p)] = int(t)
    seqs = {d: [by_pos[p] for p in range(len(by_pos))] for d, by_pos in ids.items()}
    counts = Counter(t for seq in seqs.values() for t in seq)  # every doc with rows is ok
    texts = {
        d: (run_dir.parent / "corpus" / Path(docs[d]["source"]).name).read_text() for d in seqs
    }

    seen, bucket, repeat = [], [], []
    for d, p, line in zip(rows["doc"], rows["pos"], rows["line"], strict=True):
        seq = seqs[int(d)]
        if p + 1 < len(seq):
            seen.append(seq[p + 1] in seq[: p + 1])
            bucket.append(math.floor(math.log2(counts[seq[p + 1]])))
        else:
            seen.append(None)
            bucket.append(-1)
        lines = [x.lstrip() for x in texts[int(d)].split("\n")]
        body = lines[int(line) - 1]
        repeat.append(bool(body) and body in lines[: int(line) - 1])
    assert rows["target_seen"].tolist() == seen
    assert rows["target_freq_bucket"].tolist() == bucket
    assert rows["line_repeat"].tolist() == repeat
    assert any(repeat) and not all(repeat) and any(s is False for s in seen) and any(seen)

    summary = json.loads((run_dir / "summary.json").read_text())
    n_layers = len(summary["layers"])
    final = {}
    for i in np.flatnonzero(rows["layer"] == n_layers - 1):
        final[rows["doc"][i], rows["pos"][i]] = rows["topk_ids"][i, 0]
    final_top1 = np.array([final[d, p] for d, p in zip(rows["doc"], rows["pos"], strict=True)])
    seen_a = np.array(seen, dtype=object)
    groups = {
        "seen": {"seen": seen_a == True, "novel": seen_a == False},  # noqa: E712 (None stays out)
        "line_repeat": {
            "repeated": rows["line_repeat"] == True,  # noqa: E712
            "not_repeated": rows["line_repeat"] == False,  # noqa: E712
        },
        "freq_bucket": {str(b): rows["target_freq_bucket"] == b for b in set(bucket) - {-1}},
    }
    for entry in summary["layers"]:
        in_layer = rows["layer"] == entry["layer"]
        for kind, named in groups.items():
            present = {name for name, sel in named.items() if (sel & in_layer).any()}
            assert list(entry[f"by_{kind}"]) == [n for n in entry[f"by_{kind}"] if n in present]
            assert set(entry[f"by_{kind}"]) == present, kind
            for name in present:
                _check_group(entry[f"by_{kind}"][name], rows, in_layer & named[name], final_top1)
    assert list(summary["layers"][0]["by_seen"]) == ["seen", "novel"]
    freq_keys = list(summary["layers"][0]["by_freq_bucket"])
    assert freq_keys == sorted(freq_keys, key=int)

    conv = _convergence_from_rows(rows)
    keys = list(zip(rows["doc"][first], rows["pos"][first], strict=True))
    for kind, named in groups.items():
        for name, sel in named.items():
            mine = [conv[k] for k, s in zip(keys, sel[first], strict=True) if s]
            if not mine:
                continue
            got = summary["convergence"][f"by_{kind}"][name]
            assert got["histogram"] == np.bincount(mine, minlength=n_layers).tolist(), (kind, name)


def test_each_group_sums_its_rows_in_token_order():
    """The float sums of the partials are each group's rows added one by one in token order,
    layer by layer, from 0.0, in float64: so a shard's partials are the same numbers whatever
    the memory order the aggregation runs in, on every machine (summary.json is bit for bit
    reproducible, locally and under Ray). This is our promise; the implementation keeps it by
    relying on ``np.bincount`` adding its weights in index order, which this test also pins."""
    rng = np.random.default_rng(0)
    n, t = 3, 500
    logprob = (-rng.random((n, t)) * 9).astype(np.float32)
    target_id = rng.integers(-1, 50, t).astype(np.int32)
    finite = rng.random((n, t)) > 0.05
    set_mass = np.log(rng.random((n, t, 1))).astype(np.float32)
    rows = RowValues(
        target_logprob=logprob,
        target_rank=rng.integers(0, 3000, (n, t)).astype(np.int32),
        top1=rng.integers(0, 50, (n, t)).astype(np.int32),
        finite=finite,
        entropy=None,
        kl_final=None,
        ahead_logprob=np.zeros((n, t, 0), np.float32),
        ahead_rank=np.zeros((n, t, 0), np.int32),
        set_logmass=set_mass,
        final_top1=rng.integers(0, 50, t).astype(np.int32),
        target_id=target_id,
    )
    category = rng.integers(-1, 4, t)  # long runs of few groups: the order matters most
    out = layer_partials(rows, [0, 1, 2], ["s"], {"category": (category, ["a", "b", "c", "d"])})
    mass = np.exp(set_mass[..., 0].astype(np.float64))  # numpy's exp, as the partials take it
    for layer in range(n):
        for c, name in enumerate("abcd"):
            lp_sum = mass_sum = 0.0
            for i in range(t):
                if category[i] == c and finite[layer, i]:
                    mass_sum += float(mass[layer, i])
                    if target_id[i] >= 0:
                        lp_sum += float(logprob[layer, i])
            part = out[str(layer)]["by_category"][name]
            assert part["sum_logprob"] == lp_sum  # exactly: the same additions in the same order
            assert part["set_sum_mass"]["s"] == mass_sum
