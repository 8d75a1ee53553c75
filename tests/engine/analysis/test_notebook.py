"""The notebook API (engine/analysis/notebook.py, runs.py): the README's example, run as written
there, gives the rows of a `codelens run` over the same text; bad options are named."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from codelens.engine import Lens, open_run
from codelens.engine.errors import RunDirError, SpecError
from codelens.workers.job import run_job

SOURCE = (
    "import os\n\n\nclass Store:\n    def __init__(self):\n        self.items = []\n\n"
    "    def add(self, x):\n        if x not in self.items:\n            self.items.append(x)\n"
    "        return len(self.items)\n"
) * 3


@pytest.fixture(scope="module")
def notebook_run(tiny_model_dir, tmp_path_factory, write_corpus, job_spec):
    """A `codelens run` over one file, with the options the README example passes."""
    root = tmp_path_factory.mktemp("notebook")
    corpus = write_corpus(root / "corpus", {"store.py": SOURCE})
    spec = job_spec(tiny_model_dir("llama"), corpus, root / "run", lens={"k": 10, "lookahead": [2]})
    run_job(spec, show_progress=False)
    return root


def test_readme_example_gives_the_rows_of_codelens_run(
    notebook_run, tiny_model_dir, monkeypatch, tmp_path, assert_same_rows, capsys, readme_blocks
):
    pytest.importorskip("duckdb")
    pytest.importorskip("pandas")
    [block] = readme_blocks("notebook-example")
    for written in ('"runs/demo/model"', '"engine/data/windows.py"', '"runs/demo/run"'):
        assert written in block
    block = (
        block.replace('"runs/demo/model"', repr(str(tiny_model_dir("llama"))))
        .replace('"engine/data/windows.py"', repr(str(notebook_run / "corpus" / "store.py")))
        .replace('"runs/demo/run"', repr(str(notebook_run / "run")))
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (notebook example)", "exec"), namespace)

    assert_same_rows(namespace["rows"], pq.read_table(notebook_run / "run" / "lens"))
    df, lens = namespace["df"], namespace["lens"]
    assert len(df) == namespace["rows"].num_rows and set(df.layer) == set(range(lens.n_layers + 1))
    assert (tmp_path / "grid.png").stat().st_size > 0
    run = namespace["run"]
    assert run.summary["tokens"] == len(namespace["last"])
    printed = capsys.readouterr().out
    assert f"{len(namespace['last'])} tokens, top-1 accuracy" in printed
    assert "avg(target_logprob)" in printed  # the DuckDB query's table


def test_polars_view_of_a_run(notebook_run):
    pl = pytest.importorskip("polars")
    run = open_run(notebook_run / "run", engine="polars")
    per_layer = run.rows.group_by("layer").agg(pl.len()).sort("layer").collect()
    assert per_layer["len"].to_list() == [run.summary["tokens"]] * per_layer.height
    assert run.docs.collect()["status"].to_list() == ["ok"]
    assert run.status["state"] == "done" and run.job["spec"]["lens"]["k"] == 10


def test_open_run_names_what_is_wrong(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        open_run(tmp_path)
    with pytest.raises(RunDirError, match="engine must be one of duckdb, polars"):
        open_run(tmp_path, engine="spark")


@pytest.mark.parametrize(
    "options,message",
    [
        ({"k": 0}, r"lens\.k: Input should be greater than or equal to 1"),
        ({"lookahead": [1]}, r"lens\.lookahead\.0"),
        ({"layers": [99]}, r"lens\.layers: index 99 is out of range"),
        ({"window": 4}, r"tokens\.window"),
        ({"sites": ["mlp"]}, r"lens\.sites\.0"),
    ],
)
def test_bad_options_are_named_as_in_a_job_spec(tiny_loaded_model, options, message):
    lens = Lens(tiny_loaded_model("llama"))
    with pytest.raises(SpecError, match=message):
        lens.text(SOURCE, **options)


def test_texts_with_nothing_to_run_are_refused(tiny_loaded_model):
    lens = Lens(tiny_loaded_model("llama"))
    with pytest.raises(SpecError, match="the text is empty"):
        lens.text("   \n")
    with pytest.raises(SpecError, match="metric must be one of"):
        lens.grid(SOURCE, metric="loss")


def test_text_precision_reaches_the_kernels(tiny_loaded_model):
    """``precision`` is ``lens.precision``: on a bf16 model the Triton strategies' rows then stay
    unrounded (other log-sum-exps); a bad value is refused, naming the field."""
    pytest.importorskip("triton")
    lens = Lens(tiny_loaded_model("llama", "bfloat16"))
    model = lens.text(SOURCE, impl="triton-chunked")
    fp32 = lens.text(SOURCE, impl="triton-chunked", precision="fp32")
    assert model.column("lse").to_pylist() != fp32.column("lse").to_pylist()
    with pytest.raises(SpecError, match="lens.precision"):
        lens.text(SOURCE, precision="tf32")


def test_text_options_reach_the_rows(tiny_loaded_model):
    lens = Lens(tiny_loaded_model("llama"))
    rows = lens.text(
        SOURCE, layers=[0, 2], k=3, lookahead=(), entropy=False, token_sets={"d": ["def"]}
    )
    assert sorted(set(rows.column("layer").to_pylist())) == [0, 2]
    assert rows.schema.field("topk_ids").type.list_size == 3
    for gone in ("entropy", "ahead_logprob"):
        assert gone not in rows.column_names
    assert "set_d" in rows.column_names
    plain = lens.text(SOURCE, language=None)
    assert set(plain.column("category").to_pylist()) <= {"other", "whitespace"}
