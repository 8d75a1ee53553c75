"""What a lens part file's Parquet options cost: write time per row against file size and read time.

The rows are real lens rows: a job over held-out standard-library files on the bundled model
(all layers, ``k = 10``, look-ahead ``[2, 3]``, two token sets, entropy and KL on, the default
``shard_tokens``), run once into ``--rows-dir`` and reused afterwards. The
largest committed part (one production shard) is the table every option writes. Each option
writes that same table ``--repeats`` times (round-robin over the options, after one warm-up write
each) with Arrow on one CPU thread and one I/O thread, as the host writes a part between batches.
Reported: the median wall time, its minimum and the median process CPU time (the last two are less
sensitive to other load on the machine); µs / row and rows / s use the median wall time. Every file
is then read back and checked equal to the table (NaN equal to NaN, same schema and dictionaries;
DuckDB and Polars must read the same rows too), and timed for a full ``pq.read_table`` and a
typical DuckDB aggregate (one thread). A per-column table shows what dictionary encoding costs on
each column alone, which is how the low-cardinality set is chosen.

    python benchmarks/bench_parquet.py [--rows-dir DIR] [--repeats 11] [--only TEXT] [--json PATH]

Prints Markdown (figures, machine, versions, command) for
``benchmarks/results/parquet-encoding.md``; the prose there (prediction, choice) is written by hand.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from codelens.workers.bench import machine_info
from codelens.workers.job import package_versions

ROW_GROUP_SIZE = 1 << 17  # as RunDir.commit_shard writes
LOW_CARDINALITY = ("layer", "site", "category")
"""Columns with a handful of distinct values in any part (layers, 2 sites, 10 categories)."""
DELTA_INTS = ("pos", "line", "byte_start", "byte_end")
"""Int columns that increase within a document (candidates for DELTA_BINARY_PACKED)."""
DUCKDB_QUERY = (
    "SELECT layer, category, count(*) AS n, avg(target_logprob) AS lp, avg(lse) AS lse, "
    "avg(target_rank) AS rank FROM read_parquet('{path}') GROUP BY ALL"
)


def leaf(field: pa.Field) -> str:
    """The Parquet column path of ``field``'s values: per-column options name leaves.

    A fixed-size list ``x`` is the leaf ``x.list.element``; passing ``x`` to ``use_dictionary``,
    ``use_byte_stream_split`` or ``column_encoding`` is silently ignored by pyarrow.
    """
    if pa.types.is_fixed_size_list(field.type) or pa.types.is_list(field.type):
        return f"{field.name}.list.element"
    return field.name


def value_type(field: pa.Field) -> pa.DataType:
    """``field``'s type, or its element type for a list."""
    t = field.type
    return t.value_type if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) else t


def floats(schema: pa.Schema) -> list[str]:
    """Leaf paths of the floating-point columns (scalar and list)."""
    return [leaf(f) for f in schema if pa.types.is_floating(value_type(f))]


def ints(schema: pa.Schema) -> list[str]:
    """Leaf paths of the integer columns (scalar and list)."""
    return [leaf(f) for f in schema if pa.types.is_integer(value_type(f))]


@dataclass(frozen=True)
class Option:
    """One way of writing the part: a label and ``pq.write_table`` keyword arguments."""

    name: str
    kwargs: Callable[[pa.Schema], dict[str, Any]]


def _low(
    schema: pa.Schema,
    *,
    extra_dict: tuple[str, ...] = (),
    float_encoding: str = "PLAIN",
    int_encoding: dict[str, str] | None = None,
    compression: str = "zstd",
    level: int | None = None,
) -> dict[str, Any]:
    low = [leaf(f) for f in schema if f.name in LOW_CARDINALITY]
    dictionary = low + [c for c in extra_dict if c not in low]
    encoding = {c: float_encoding for c in floats(schema)}
    encoding |= {c: e for c, e in (int_encoding or {}).items() if c not in dictionary}
    kw: dict[str, Any] = {
        "use_dictionary": dictionary,
        "column_encoding": encoding,
        "compression": compression,
    }
    if level is not None:
        kw["compression_level"] = level
    return kw


def options() -> list[Option]:
    """The options compared: today's writer first, then per-column choices and codecs."""
    opts = [
        Option(
            "current: dictionary on all, zstd (default level)", lambda s: {"compression": "zstd"}
        ),
        Option("dict layer/site/category, floats PLAIN, zstd", lambda s: _low(s)),
        Option(
            "dict layer/site/category + doc, floats PLAIN, zstd",
            lambda s: _low(s, extra_dict=("doc",)),
        ),
        Option(
            "dict on every int column, floats PLAIN, zstd",
            lambda s: _low(s, extra_dict=tuple(ints(s))),
        ),
    ]
    codecs: list[tuple[str, str, int | None]] = [
        ("zstd", "zstd", None),
        ("zstd 1", "zstd", 1),
        ("zstd 3", "zstd", 3),
        ("lz4", "lz4", None),
        ("snappy", "snappy", None),
    ]
    for label, codec, level in codecs:
        for enc in ("PLAIN", "BYTE_STREAM_SPLIT"):
            if label == "zstd" and enc == "PLAIN":
                continue  # the second option above
            opts.append(
                Option(
                    f"dict layer/site/category, floats {enc}, {label}",
                    lambda s, enc=enc, codec=codec, level=level: _low(
                        s, float_encoding=enc, compression=codec, level=level
                    ),
                )
            )
    for label, codec, level in (
        ("zstd", "zstd", None),
        ("lz4", "lz4", None),
        ("snappy", "snappy", None),
    ):
        opts.append(
            Option(
                f"dict layer/site/category, floats BYTE_STREAM_SPLIT, "
                f"pos/line/bytes DELTA_BINARY_PACKED, {label}",
                lambda s, codec=codec, level=level: _low(
                    s,
                    float_encoding="BYTE_STREAM_SPLIT",
                    int_encoding={c: "DELTA_BINARY_PACKED" for c in DELTA_INTS if c in s.names},
                    compression=codec,
                    level=level,
                ),
            )
        )
    return opts


# -- rows ---------------------------------------------------------------------------------------


def make_rows(rows_dir: Path, n_files: int) -> Path:
    """Run the lens job into ``rows_dir/run`` (once) and return its largest part file."""
    run = rows_dir / "run"
    if not (run / "summary.json").exists():
        from codelens.engine.schemas import validate_spec
        from codelens.workers.demo import install_model, stdlib_sample
        from codelens.workers.job import run_job

        model = install_model(rows_dir / "model")
        spec = validate_spec(
            {
                "name": "bench-parquet",
                "model": {"path": str(model), "device": "cpu", "dtype": "float32"},
                "corpus": {"kind": "files", "paths": [str(p) for p in stdlib_sample(n_files)]},
                "tokens": {"window": 256, "overlap": 32, "add_bos": True},
                "lens": {
                    "layers": "all",
                    "k": 10,
                    "lookahead": [2, 3],
                    "token_sets": {
                        "keywords": ["def", "return", "import", "class", "self"],
                        "brackets": ["(", ")", "[", "]", "{", "}"],
                    },
                },
                "output": {"dir": str(run)},
                "execution": {"backend": "local"},
            }
        )
        run_job(spec, overwrite=True, show_progress=False)
    parts = sorted((run / "lens").glob("part-*.parquet"), key=lambda p: p.stat().st_size)
    return parts[-1]


# -- checks and timing --------------------------------------------------------------------------


def same_rows(a: pa.Table, b: pa.Table) -> None:
    """Raise unless ``a`` and ``b`` have the same schema, dictionaries and values (NaN == NaN)."""
    if a.schema != b.schema or a.num_rows != b.num_rows:
        raise AssertionError(f"schema or row count differs:\n{a.schema}\n---\n{b.schema}")
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_dictionary(x.type):
            if not x.dictionary.equals(y.dictionary):
                raise AssertionError(f"{name}: dictionary differs")
            x, y = x.indices, y.indices
        if pa.types.is_fixed_size_list(x.type):
            x, y = x.flatten(), y.flatten()
        if x.null_count != y.null_count or not x.is_null().equals(y.is_null()):
            raise AssertionError(f"{name}: nulls differ")
        np.testing.assert_array_equal(
            x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False), err_msg=name
        )


def duckdb_seconds(path: Path, repeats: int) -> tuple[float, int]:
    """Median seconds of ``DUCKDB_QUERY`` on ``path`` (one thread) and its result's row count."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 1")
    query = DUCKDB_QUERY.format(path=path)
    con.execute(query).fetchall()  # warm-up (page cache, parser)
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = len(con.execute(query).fetchall())
        times.append(time.perf_counter() - t0)
    con.close()
    return statistics.median(times), n


def check_duckdb(path: Path, table: pa.Table) -> None:
    """DuckDB reads the same rows from ``path`` as the table holds (``EXCEPT ALL`` both ways)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 1")
    con.register("t", table)
    f = f"read_parquet('{path}')"
    n = con.execute(f"SELECT count(*) FROM {f}").fetchone()[0]
    extra = con.execute(f"SELECT count(*) FROM (FROM {f} EXCEPT ALL FROM t)").fetchone()[0]
    missing = con.execute(f"SELECT count(*) FROM (FROM t EXCEPT ALL FROM {f})").fetchone()[0]
    con.close()
    if (n, extra, missing) != (table.num_rows, 0, 0):
        raise AssertionError(
            f"DuckDB reads other rows from {path}: {n} rows, {extra} extra, {missing} missing"
        )


def check_polars(path: Path, table: pa.Table) -> None:
    """Polars reads the same frame from ``path`` as from the table (NaN equal to NaN)."""
    try:
        import polars as pl
        from polars.testing import assert_frame_equal
    except ImportError:
        return
    assert_frame_equal(pl.read_parquet(path), pl.from_arrow(table))


def time_writes(
    table: pa.Table, opts: list[Option], out: Path, repeats: int
) -> list[dict[str, Any]]:
    """Write ``table`` under every option ``repeats`` times (round-robin); medians and sizes."""
    paths = [out / f"opt{i:02d}.parquet" for i in range(len(opts))]
    kwargs = [o.kwargs(table.schema) for o in opts]
    times: list[list[float]] = [[] for _ in opts]
    cpu: list[list[float]] = [[] for _ in opts]
    for rep in range(repeats + 1):
        for i, kw in enumerate(kwargs):
            paths[i].unlink(missing_ok=True)
            c0, t0 = time.process_time(), time.perf_counter()
            pq.write_table(table, paths[i], row_group_size=ROW_GROUP_SIZE, **kw)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rep:  # the first round is a warm-up
                times[i].append(dt)
                cpu[i].append(dc)
    results = []
    for o, kw, path, ts, cs in zip(opts, kwargs, paths, times, cpu, strict=True):
        back = pq.read_table(path)
        same_rows(table, back)
        check_duckdb(path, table)
        check_polars(path, table)
        reads = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pq.read_table(path)
            reads.append(time.perf_counter() - t0)
        dq, _ = duckdb_seconds(path, repeats)
        md = pq.ParquetFile(path).metadata
        encodings = {
            md.row_group(0).column(j).path_in_schema: md.row_group(0).column(j).encodings
            for j in range(md.num_columns)
        }
        results.append(
            {
                "option": o.name,
                "kwargs": {k: v for k, v in kw.items()},
                "write_s": statistics.median(ts),
                "write_s_min": min(ts),
                "write_cpu_s": statistics.median(cs),
                "bytes": path.stat().st_size,
                "read_s": statistics.median(reads),
                "duckdb_s": dq,
                "encodings": encodings,
            }
        )
    return results


def time_commit(table: pa.Table, out: Path, repeats: int) -> dict[str, Any]:
    """``RunDir.commit_shard`` as shipped (its encodings, plus fsync, rename and manifest line)."""
    from codelens.engine.run.rundir import RunDir

    rd = RunDir(out / "commit")
    rd.prepare("bench", "bench", overwrite=False)
    times, cpu = [], []
    for rep in range(repeats + 1):
        c0, t0 = time.process_time(), time.perf_counter()
        rd.commit_shard(0, table, {"n_tokens": 0})
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if rep:
            times.append(dt)
            cpu.append(dc)
    path = rd.part_path(0)
    same_rows(table, pq.read_table(path))
    check_duckdb(path, table)
    check_polars(path, table)
    reads = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pq.read_table(path)
        reads.append(time.perf_counter() - t0)
    return {
        "option": "RunDir.commit_shard as shipped (PART_ENCODING; + fsync, rename, manifest)",
        "kwargs": {},
        "write_s": statistics.median(times),
        "write_s_min": min(times),
        "write_cpu_s": statistics.median(cpu),
        "bytes": path.stat().st_size,
        "read_s": statistics.median(reads),
        "duckdb_s": duckdb_seconds(path, repeats)[0],
    }


def time_columns(table: pa.Table, out: Path, repeats: int) -> list[dict[str, Any]]:
    """Each column alone, with and without dictionary encoding (zstd): the per-column cost."""
    path = out / "column.parquet"
    rows = []
    for name in table.column_names:
        one = table.select([name])
        col = one.column(0)
        flat = col.combine_chunks()
        if pa.types.is_fixed_size_list(flat.type):
            flat = flat.flatten()
        if pa.types.is_dictionary(flat.type):
            flat = flat.indices
        distinct = len(flat.unique())
        row: dict[str, Any] = {"column": name, "distinct": distinct}
        for label, dictionary in (("dict", True), ("plain", False)):
            ts = []
            for rep in range(repeats + 1):
                t0 = time.perf_counter()
                pq.write_table(
                    one,
                    path,
                    row_group_size=ROW_GROUP_SIZE,
                    compression="zstd",
                    use_dictionary=dictionary,
                )
                if rep:
                    ts.append(time.perf_counter() - t0)
            row[f"{label}_s"] = statistics.median(ts)
            row[f"{label}_bytes"] = path.stat().st_size
            if not dictionary and pa.types.is_dictionary(col.type):
                # Without dictionary encoding a dictionary column reads back with only the values
                # present: the row contract's fixed dictionaries are lost.
                back = pq.read_table(path).column(0).combine_chunks()
                row["plain_keeps_dictionary"] = back.dictionary.equals(
                    col.combine_chunks().dictionary
                )
        rows.append(row)
    path.unlink(missing_ok=True)
    return rows


# -- report -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine (``workers.bench.machine_info``), library versions and Arrow thread settings."""
    return {
        **machine_info(),
        "versions": package_versions(extra=("duckdb", "polars", "numpy")),
        "arrow_cpu_threads": pa.cpu_count(),
        "arrow_io_threads": pa.io_thread_count(),
    }


def markdown(
    part: Path, table: pa.Table, results: list[dict[str, Any]], columns: list[dict[str, Any]]
) -> str:
    """The figures as Markdown tables."""
    n = table.num_rows
    base = results[0]
    mib = 2**20
    lines = [
        f"Table: `{part.name}` of the bench job, {n:,} rows x {table.num_columns} columns, "
        f"{table.nbytes / mib:.1f} MiB in Arrow, {table.column(0).num_chunks} chunks; "
        f"row groups of {ROW_GROUP_SIZE:,} rows.",
        "",
        "| option | write s | min s | CPU s | µs / row | rows / s | write speed-up | size MiB "
        "| size vs current | pq.read_table s | DuckDB query s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['option']} | {r['write_s']:.3f} | {r['write_s_min']:.3f} "
            f"| {r['write_cpu_s']:.3f} "
            f"| {r['write_s'] / n * 1e6:.2f} "
            f"| {n / r['write_s'] / 1e6:.2f} M | {base['write_s'] / r['write_s']:.2f}x "
            f"| {r['bytes'] / mib:.2f} | {(r['bytes'] / base['bytes'] - 1) * 100:+.1f} % "
            f"| {r['read_s']:.3f} | {r['duckdb_s']:.3f} |"
        )
    if not columns:
        return "\n".join(lines)
    lines += [
        "",
        "Per column (that column alone, zstd default level, dictionary on vs off):",
        "",
        "| column | distinct in part | dict write ms | plain write ms | dict KiB | plain KiB "
        "| plain keeps the dictionary |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in columns:
        keeps = {None: "", True: "yes", False: "no"}[c.get("plain_keeps_dictionary")]
        lines.append(
            f"| {c['column']} | {c['distinct']:,} | {c['dict_s'] * 1e3:.1f} "
            f"| {c['plain_s'] * 1e3:.1f} | {c['dict_bytes'] / 1024:,.0f} "
            f"| {c['plain_bytes'] / 1024:,.0f} | {keeps} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, make the rows, time every option, print Markdown (and JSON if asked)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "codelens-bench-parquet",
        help="where the lens job runs once and is reused (default: %(default)s)",
    )
    p.add_argument("--files", type=int, default=24, help="stdlib files in the job's corpus")
    p.add_argument("--repeats", type=int, default=11, help="timed writes per option")
    p.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="time only the options whose label contains TEXT (repeatable; the current writer, "
        "the baseline, always runs)",
    )
    p.add_argument("--skip-columns", action="store_true", help="no per-column table")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args()

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    part = make_rows(args.rows_dir, args.files)
    table = pq.read_table(part)
    if table.num_rows < 200_000:
        sys.exit(f"{part} has {table.num_rows} rows; use more --files for >= 200k rows")
    with tempfile.TemporaryDirectory(prefix="bench-parquet-") as tmp:
        out = Path(tmp)
        opts = options()
        if args.only:
            opts = opts[:1] + [o for o in opts[1:] if any(t in o.name for t in args.only)]
        results = time_writes(table, opts, out, args.repeats)
        results.append(time_commit(table, out, args.repeats))
        columns = [] if args.skip_columns else time_columns(table, out, args.repeats)
    info = machine()
    command = "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(markdown(part, table, results, columns))
    print()
    print(f"Machine: {info['cpu']}, {info['cpus']} CPUs, {info['platform']}  ")
    print(
        f"Arrow threads: cpu {info['arrow_cpu_threads']}, io {info['arrow_io_threads']}; "
        "DuckDB threads: 1  "
    )
    print(f"Versions: {info['versions']}  ")
    print(f"Command: `{command}` (median of {args.repeats} after one warm-up)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "command": command, "results": results, "columns": columns},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
