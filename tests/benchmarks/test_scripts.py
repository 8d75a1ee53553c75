"""The benchmark scripts run as a user runs them, at their smallest sizes, and write figures.

Each script is started as ``python benchmarks/<script>.py ... --out <tmp>`` (never into
``benchmarks/results/``, which holds the recorded figures) and its JSON is read back: the checks
are on what the figures must satisfy whatever the machine (row counts, sums, identical rows), not
on speed. ``gpu_check.sh`` (with ``bench_kernel.py`` and ``bench_gpu_pipeline.py`` in it) is
the one command prepared for a GPU machine: its CPU smoke run here is what keeps the device time
of that single call from going to a broken script. Left out: ``bench_padding.py`` (minutes: it
times real shards), ``bench_parquet.py`` (needs 200k rows), ``bench_ray_scaling.py`` and
``bench_lens.py`` (tens of runs); ``test_bench_kernel.py`` tests ``bench_kernel``'s driver.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_benchmark(script: str, out: Path, result: str, *args: str) -> dict[str, Any]:
    """Run ``script`` with ``--out out`` and return its ``result``.json, checking that the
    Markdown beside it was written and that the figures carry their provenance."""
    proc = run_script(script, *args, "--out", str(out))
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    record = json.loads((out / f"{result}.json").read_text())
    assert (out / f"{result}.md").read_text().strip()
    for key in ("machine", "versions", "command", "written_at"):
        assert record.get(key), f"{result}.json has no {key}"
    assert record["versions"]["torch"]
    return record


def test_host_path(tmp_path: Path) -> None:
    r = run_benchmark(
        "bench_host.py", tmp_path, "host_path", "--tokens", "512", "--repeats", "1", "--files", "2"
    )
    assert r["rows"] == r["tokens"] * r["rows_per_token"] > 0
    stages = r["us_per_row"]
    assert set(stages) == set(r["seconds"]) and len(stages) == 5
    assert all(v > 0 for v in stages.values())
    assert math.isclose(r["us_per_row_total"], sum(stages.values()), rel_tol=1e-9)
    assert r["part_bytes_per_row"] > 0
    assert set(r["driver_seconds_per_shard"]) == {
        "writes the part (before)",
        "renames a staged part (now)",
    }


def test_overlap(tmp_path: Path) -> None:
    r = run_benchmark(
        "bench_overlap.py", tmp_path, "overlap", "--files", "1", "--layers", "2", "--d-model", "64"
    )
    assert r["rows_identical"] is True
    assert r["tokens"] > 0
    assert set(r["end_to_end_s"]) == {"sequential", "overlapped"}
    assert all(v > 0 for v in r["tokens_per_s"].values())


def test_topk_rounds(tmp_path: Path) -> None:
    r = run_benchmark(
        "bench_topk_rounds.py", tmp_path, "topk_rounds", "--rows", "128", "--sources", "bundled"
    )
    source = r["sources"]["bundled"]
    assert source["rows"].endswith(", 128 rows")
    tiles = source["all_tiles"]
    assert tiles["tiles"] > 0
    # A tile inserts at least as much for its worst row as for its mean row, and at most k.
    assert tiles["mean_row_insertions_per_tile"] <= tiles["fused_rounds_per_tile"] <= r["k"]
    assert 0 < source["fold_rounds_per_step"] <= r["k"]
    for fractions in source["prediction"]["fraction_of_cublas"].values():
        assert set(fractions) == {"fused", "fused_slot_kl", "chunked"}
        assert all(0 < v < 1 for v in fractions.values())
    # Every fused configuration of kernel_sm90.json whose tile was counted is predicted: the
    # default's serial figures are the table's, and two CTAs per SM can only overlap better.
    candidates = source["prediction"]["fused_candidates"]
    default = candidates[0]
    assert (default["tile"], default["warps"], default["ctas_per_sm"]) == ("128x128", 8, 1)
    for shape, fractions in default["fraction_of_cublas"].items():
        assert fractions == {"serial": source["prediction"]["fraction_of_cublas"][shape]["fused"]}
    two_ctas = [c for c in candidates if c["ctas_per_sm"] >= 2]
    assert two_ctas and {c["tile"] for c in candidates} >= {"128x64", "64x64", "128x256"}
    for c in two_ctas:
        for fractions in c["fraction_of_cublas"].values():
            assert 0 < fractions["serial"] <= fractions["overlapped"] < 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "64"], "--rows 64: at least 128"),
        (["--tiles", "64"], "write a tile as BLOCK_MxBLOCK_N"),
    ],
)
def test_topk_rounds_bad_arguments(args: list[str], message: str) -> None:
    proc = run_script("bench_topk_rounds.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_gpu_pipeline_cpu_smoke(tmp_path: Path) -> None:
    r = run_benchmark(
        "bench_gpu_pipeline.py",
        tmp_path,
        "gpu_pipeline",
        "--device",
        "cpu",
        "--tokens",
        "2048",
        "--batch-tokens",
        "1024",
        "--shard-tokens",
        "1024",
        "--budget-s",
        "200",
        "--tmp-dir",
        str(tmp_path),
        "--model-tmp",
        str(tmp_path),
    )
    shape = r["shapes"]["tiny"]
    assert shape["state"] == "done", shape.get("error")
    end_to_end, compute = shape["end_to_end"], shape["compute_only"]
    assert end_to_end["tokens"] == compute["tokens"] >= 2048
    assert not end_to_end["truncated"] and not compute["truncated"]
    assert end_to_end["gpu_busy_mean_pct"] is None  # not measured on a CPU
    assert shape["compute_over_end_to_end"] > 0
    # The child removes the saved model and its work directory when it is done.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_pipeline.json", "gpu_pipeline.md"]


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    """The one prepared GPU command, through its shell wrapper, as its CPU smoke run: every stage
    runs and passes, the summary holds each stage's figures, and what lands in the results folder
    is what a lent machine's call can return (at most 8 files)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu"]
        + ["--budget-s", "280", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, f"gpu_check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    summary = json.loads((tmp_path / "gpu_check-summary.json").read_text())
    assert {name: s["status"] for name, s in summary["stages"].items()} == {
        "tests": "passed",
        "kernel": "passed",
        "pipeline": "passed",
    }
    assert summary["stages"]["tests"]["counts"]["passed"] >= 2
    assert "failed" not in summary["stages"]["tests"]["counts"]
    kernel = summary["kernel"]
    assert kernel["checks"] == {"triton-fused": True, "triton-chunked": True}
    assert {r["strategy"] for r in kernel["fraction_of_matmul"]} == set(kernel["checks"])
    assert [c["d"] for c in kernel["defaults"]] == [64]
    [shape] = summary["pipeline"]["shapes"].values()
    assert shape["state"] == "done" and shape["end_to_end_tokens_per_s"] > 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) <= 8 and all(p.is_file() for p in tmp_path.iterdir())
    assert {"gpu_check.log", "gpu_check-summary.md", "gpu_pipeline.json"} <= set(names)
    assert sum(n.startswith("kernel-") for n in names) == 2
    assert "## Kernels" in (tmp_path / "gpu_check-summary.md").read_text()
