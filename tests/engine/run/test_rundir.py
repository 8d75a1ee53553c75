"""The run directory's commit protocol and row contract."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codelens.engine.data.syntax import CATEGORIES
from codelens.engine.errors import RunDirError
from codelens.engine.row_schema import SITES, lens_schema
from codelens.engine.run.rundir import RunDir, manifest_line, write_part


def _table(n: int) -> pa.Table:
    return pa.table({"doc": pa.array(range(n), pa.int32())})


def _lens_rows(n_tokens: int, n_layers: int = 3, k: int = 4, seed: int = 0) -> pa.Table:
    """A lens table of the full row contract (every optional column on, two token sets), with
    nulls, NaN and -inf where real rows have them, in two chunks, as a shard's table arrives."""
    rng = np.random.default_rng(seed)
    schema = lens_schema(k, 2, ["kw", "ops"], entropy=True, kl_final=True)
    n = n_tokens * n_layers
    pos = np.tile(np.arange(n_tokens, dtype=np.int32), n_layers)
    layer = np.repeat(np.arange(n_layers, dtype=np.int16), n_tokens)
    no_span = rng.random(n) < 0.05  # tokens planned without spans: null line / bytes / category

    def floats(*shape: int) -> np.ndarray:
        x = rng.normal(-3.0, 2.0, size=(n, *shape)).astype(np.float32)
        x.reshape(-1)[rng.random(x.size) < 0.01] = np.nan
        return x

    def ints(high: int, *shape: int) -> np.ndarray:
        return rng.integers(0, high, size=(n, *shape), dtype=np.int32)

    set_kw = floats()
    set_kw[rng.random(n) < 0.01] = -np.inf  # log mass of a set the lens gives no probability
    columns = {
        "doc": (pos // 700).astype(np.int32),
        "pos": pos,
        "layer": layer,
        "site": (rng.random(n) < 0.5).astype(np.int8),
        "token_id": ints(4096),
        "target_id": ints(4096),
        "target_seen": rng.random(n) < 0.6,
        "target_freq_bucket": ints(16).astype(np.int8),
        "line": pos // 12,
        "byte_start": pos * 4,
        "byte_end": pos * 4 + 3,
        "category": ints(len(CATEGORIES) - 2).astype(np.int8),  # two categories never occur
        "line_repeat": rng.random(n) < 0.2,
        "lse": floats(),
        "entropy": floats(),
        "target_logprob": floats(),
        "target_rank": ints(4096),
        "kl_final": floats(),
        "topk_ids": ints(4096, k),
        "topk_logprobs": floats(k),
        "ahead_logprob": floats(2),
        "ahead_rank": ints(4096, 2),
        "set_kw": set_kw,
        "set_ops": floats(),
        "residual_finite": rng.random(n) < 0.999,
    }
    arrays = []
    for field in schema:
        x = columns[field.name]
        mask = (
            no_span
            if field.name in ("line", "byte_start", "byte_end", "category", "line_repeat")
            else None
        )
        if pa.types.is_dictionary(field.type):
            names = SITES if field.name == "site" else CATEGORIES
            indices = pa.array(x, field.type.index_type, mask=mask)
            arrays.append(pa.DictionaryArray.from_arrays(indices, pa.array(names, pa.string())))
        elif pa.types.is_fixed_size_list(field.type):
            values = pa.array(x.reshape(-1), field.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(values, field.type.list_size))
        else:
            arrays.append(pa.array(x, field.type, mask=mask))
    table = pa.Table.from_arrays(arrays, schema=schema)
    half = n // 2
    return pa.concat_tables([table.slice(0, half), table.slice(half)])


def _leaf_encodings(path) -> dict[str, set[str]]:
    """Top-level column name -> the Parquet encodings of its leaf in any row group."""
    meta = pq.ParquetFile(path).metadata
    found: dict[str, set[str]] = {}
    for g in range(meta.num_row_groups):
        for i in range(meta.num_columns):
            column = meta.row_group(g).column(i)
            found.setdefault(column.path_in_schema.split(".")[0], set()).update(column.encodings)
    return found


def test_schema_has_the_design_columns_and_drops_switched_off_ones():
    full = lens_schema(5, 2, ["py"], entropy=True, kl_final=True)
    assert full.names == [
        "doc",
        "pos",
        "layer",
        "site",
        "token_id",
        "target_id",
        "target_seen",
        "target_freq_bucket",
        "line",
        "byte_start",
        "byte_end",
        "category",
        "line_repeat",
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


def test_a_part_a_worker_staged_is_committed_by_rename(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare("f1", "job", overwrite=False)
    first, second = rd.staging_path(4, "run1-1"), rd.staging_path(4, "run1-2")
    assert first != second and first.parent == rd.staging_dir != rd.lens_dir
    write_part(_table(3), first)  # two workers wrote shard 4 (a retry); the driver commits one
    write_part(_table(3), second)
    assert list(rd.lens_dir.iterdir()) == [], "a staged part is not a part of the run yet"
    rd.commit_part(4, second, manifest_line(4, {"n_tokens": 3}))
    assert [p.name for p in rd.lens_dir.iterdir()] == ["part-000004.parquet"]
    assert set(rd.committed()) == {4} and not second.exists()
    assert pq.read_table(rd.part_path(4)).equals(_table(3))
    rd.clear_staging()  # the attempt not committed goes with the staging folder
    assert not rd.staging_dir.exists()
    # A part the driver cannot see (written on another node's local disk) is named, with the fix.
    with pytest.raises(RunDirError, match=r"shard 5 is not at .*shared by every node"):
        rd.commit_part(5, rd.staging_path(5, "run1-3"), manifest_line(5, {"n_tokens": 1}))
    assert set(rd.committed()) == {4}


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


def test_committed_part_reads_back_the_rows_written(tmp_path, assert_same_rows):
    """pyarrow, DuckDB and Polars read a committed part back as exactly the table written: same
    schema, values (NaN, -inf, nulls) and the row contract's full dictionaries, also across
    several row groups."""
    table = _lens_rows(45_000)  # 135k rows: two row groups
    rd = RunDir(tmp_path / "run")
    rd.prepare("f", "job", overwrite=False)
    rd.commit_shard(0, table, {"n_tokens": 45_000})
    path = rd.part_path(0)
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    back = pq.read_table(path)
    assert_same_rows(table, back)
    for name, names in (("site", SITES), ("category", CATEGORIES)):
        got = back.column(name).combine_chunks()
        want = table.column(name).combine_chunks()
        assert got.type == want.type
        assert got.dictionary.to_pylist() == list(names), "the whole fixed dictionary, in order"
        assert got.indices.equals(want.indices)

    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.register("t", table)
    part = f"read_parquet('{path}')"
    assert con.execute(f"SELECT count(*) FROM {part}").fetchone()[0] == table.num_rows
    for a, b in ((part, "t"), ("t", part)):
        assert (
            con.execute(f"SELECT count(*) FROM (FROM {a} EXCEPT ALL FROM {b})").fetchone()[0] == 0
        )
    con.close()

    pl = pytest.importorskip("polars")
    from polars.testing import assert_frame_equal

    assert_frame_equal(pl.read_parquet(path), pl.from_arrow(table))


def test_part_uses_dictionary_only_on_low_cardinality_columns(tmp_path):
    """Dictionary encoding on layer, site and category only; floats byte-stream-split; positions
    as deltas; the remaining columns plain."""
    table = _lens_rows(2_000)
    rd = RunDir(tmp_path / "run")
    rd.prepare("f", "job", overwrite=False)
    rd.commit_shard(0, table, {"n_tokens": 2_000})
    encodings = _leaf_encodings(rd.part_path(0))
    assert set(encodings) == set(table.column_names)
    dictionary = {"layer", "site", "category"}
    floats = {
        "lse",
        "entropy",
        "target_logprob",
        "kl_final",
        "topk_logprobs",
        "ahead_logprob",
        "set_kw",
        "set_ops",
    }
    delta = {"pos", "line", "byte_start", "byte_end"}
    for name, found in encodings.items():
        dictionary_encoded = bool(found & {"RLE_DICTIONARY", "PLAIN_DICTIONARY"})
        assert dictionary_encoded == (name in dictionary), (name, found)
        assert ("BYTE_STREAM_SPLIT" in found) == (name in floats), (name, found)
        assert ("DELTA_BINARY_PACKED" in found) == (name in delta), (name, found)
        if name not in dictionary | floats | delta:
            assert "PLAIN" in found, (name, found)
