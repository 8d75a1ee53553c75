"""The run directory's commit protocol and row contract."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codelens.engine.errors import RunDirError
from codelens.engine.row_schema import lens_schema
from codelens.engine.run.rundir import RunDir


def _table(n: int) -> pa.Table:
    return pa.table({"doc": pa.array(range(n), pa.int32())})


def test_schema_has_the_design_columns_and_drops_switched_off_ones():
    full = lens_schema(5, 2, ["py"], entropy=True, kl_final=True)
    assert full.names == [
        "doc",
        "pos",
        "layer",
        "site",
        "token_id",
        "target_id",
        "line",
        "byte_start",
        "byte_end",
        "category",
        "lse",
        "entropy",
        "target_logprob",
        "target_rank",
        "kl_final",
        "topk_ids",
        "topk_logprobs",
        "ahead_logprob",
        "ahead_rank",
        "set_py",
        "residual_finite",
    ]
    assert full.field("layer").type == pa.int16()
    assert full.field("topk_ids").type == pa.list_(pa.int32(), 5)
    assert full.field("ahead_rank").type == pa.list_(pa.int32(), 2)
    lean = lens_schema(1, 0, [], entropy=False, kl_final=False)
    for gone in ("entropy", "kl_final", "ahead_logprob", "ahead_rank"):
        assert gone not in lean.names


def test_commit_is_atomic_and_listed_once(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare("f1", "job", overwrite=False)
    rd.commit_shard(0, _table(3), {"n_tokens": 3})
    rd.commit_shard(1, _table(2), {"n_tokens": 2})
    rd.commit_shard(1, _table(2), {"n_tokens": 2})  # a retried shard overwrites its own file
    assert sorted(p.name for p in rd.lens_dir.iterdir()) == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    assert set(rd.committed()) == {0, 1}
    assert pq.read_table(rd.part_path(0)).num_rows == 3
    # A crash mid-append leaves a torn last line: it is ignored and that shard is redone.
    with open(rd.manifest_file, "a") as f:
        f.write('{"shard": 2, "n_tok')
    assert set(rd.committed()) == {0, 1}
    # A manifest line whose part file is gone does not count as committed.
    rd.part_path(0).unlink()
    assert set(rd.committed()) == {1}


def test_different_job_is_refused_unless_overwrite(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare("aaa", "first", overwrite=False)
    rd.job_file.write_text(json.dumps({"name": "first", "fingerprint": "aaa"}))
    rd.commit_shard(0, _table(1), {"n_tokens": 1})
    rd.prepare("aaa", "first", overwrite=False)  # same job: resume
    assert set(rd.committed()) == {0}
    with pytest.raises(RunDirError, match="different job.*--overwrite"):
        rd.prepare("bbb", "second", overwrite=False)
    assert rd.part_path(0).exists(), "a refused job must not touch the existing results"
    assert rd.prepare("bbb", "second", overwrite=True) is True
    assert rd.part_path(0).exists(), "prepare never deletes: the caller clears once the job loaded"
    rd.clear()
    assert not rd.job_file.exists() and rd.committed() == {}


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="not writable.*output.dir"):
        RunDir(blocker / "run").prepare("f", "job", overwrite=False)


def test_status_is_replaced_without_leftovers(tmp_path):
    rd = RunDir(tmp_path)
    rd.prepare("f", "job", overwrite=False)
    for i in range(3):
        rd.write_status({"state": "running", "i": i})
    assert rd.read_status() == {"state": "running", "i": 2}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
