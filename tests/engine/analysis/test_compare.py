"""``codelens compare``: several runs on a relative-depth axis, refusal of different corpora, and
the page opened in headless Chromium."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from codelens.workers.job import run_job

CODE = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
LENS = {"k": 1, "lookahead": [], "token_sets": {}}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, write_corpus, job_spec):
    root = tmp_path_factory.mktemp("compare")
    same = write_corpus(root / "corpus", {"a.py": CODE})
    other = write_corpus(root / "other", {"b.py": CODE.replace("add", "mul")})
    jobs = (
        (tiny_model_dir("llama"), same, root / "llama", "llama2"),
        (tiny_model_dir("qwen2", n_layers=3), same, root / "qwen", "qwen3l"),
        (tiny_model_dir("llama"), other, root / "other", "other"),
    )
    for model, corpus, out, name in jobs:
        run_job(job_spec(model, corpus, out, name=name, lens=LENS), show_progress=False)
    return (*(out for _, _, out, _ in jobs), root)


def test_compare_writes_a_page_on_relative_depth(runs, invoke):
    a, b, _, root = runs
    result = invoke("compare", a, b, "--out", root / "cmp")
    assert result.exit_code == 0, result.output
    page = (root / "cmp" / "index.html").read_text()
    assert (root / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "llama2 (llama, L=2)" in page and "qwen3l (qwen2, L=3)" in page
    # Every layer of both runs is in the table, at layer / L.
    for run_dir, n in ((a, 2), (b, 3)):
        summary = json.loads((run_dir / "summary.json").read_text())
        for entry in summary["layers"]:
            assert f"<td>{entry['layer'] / n:.2f}</td>" in page
            assert f"{entry['top1_accuracy']:.3f}" in page
    assert "Warning" not in page


def test_compare_refuses_different_corpora_unless_allowed(runs, invoke):
    a, _, c, root = runs
    result = invoke("compare", a, c, "--out", root / "bad")
    assert result.exit_code == 2 and "different corpora" in result.output
    assert "--allow-different-corpora" in result.output
    assert not (root / "bad" / "index.html").exists()
    result = invoke("compare", a, c, "--out", root / "bad", "--allow-different-corpora")
    assert result.exit_code == 0, result.output
    assert "Warning: the runs read different corpora" in (root / "bad" / "index.html").read_text()


def test_compare_needs_two_finished_runs(runs, tmp_path, invoke):
    a, _, _, _ = runs
    result = invoke("compare", a, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "at least two" in result.output
    result = invoke("compare", a, tmp_path, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "summary.json" in result.output


def test_compare_with_default_runs_the_bundled_model_on_the_same_corpus(runs, tmp_path, invoke):
    a, _, _, _ = runs
    out = tmp_path / "beside"
    result = invoke("compare", a, "--out", out, "--with-default")
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert "llama2 (llama, L=2)" in page and "codelens-debian-code beside llama2" in page
    assert "Warning" not in page  # the same documents: nothing to allow
    mine = pq.read_table(a / "docs.parquet").column("source").to_pylist()
    theirs = pq.read_table(out / "default-run" / "docs.parquet").column("source").to_pylist()
    assert mine == theirs
    spec = json.loads((out / "default-run" / "job.json").read_text())["spec"]
    assert (
        spec["lens"]["k"] == 1
        and spec["tokens"] == json.loads((a / "job.json").read_text())["spec"]["tokens"]
    )
    # A second call resumes the finished run instead of recomputing it.
    before = (out / "default-run" / "summary.json").stat().st_mtime_ns
    assert invoke("compare", a, "--out", out, "--with-default").exit_code == 0
    assert (out / "default-run" / "summary.json").stat().st_mtime_ns == before


def test_compare_renders_in_headless_chromium(runs, tmp_path, invoke, chromium):
    a, b, _, root = runs
    assert invoke("compare", a, b, "--out", root / "shown").exit_code == 0
    seen = chromium.inspect(root / "shown" / "index.html", tmp_path)
    assert len(seen["imgs"]) == 1
    _, width, height = seen["imgs"][0]
    assert width > 500 and height > 300, "the figure did not load or decode in the browser"
    assert seen["tables"] == [1 + 3 + 4], "a header row plus one row per layer of each run"
    assert seen["h2"] == ["Per-layer curves", "Numbers per layer"]
