"""``bench_kernel.py``'s check-and-time driver, at the CPU smoke shape (kernels in the interpreter).

The GPU run of ``bench_kernel`` is a single call on a lent machine: these tests make sure that one
failing strategy (a check that fails, a kernel that raises) or a time budget that runs out costs
only what it touches, that the figures so far are written after every step, and that the default
per width is chosen only among strategies that were checked and timed at every shape. Failures
are injected here, by replacing the script's ``check`` and ``strategy_fn``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_kernel():
    path = ROOT / "benchmarks" / "bench_kernel.py"
    spec = importlib.util.spec_from_file_location("bench_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernel"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_kernel"]


def one_call_timer(fn, quantiles=None, **_: Any) -> float | list[float]:
    """A timer that runs ``fn`` once (the figures are not what is tested here) and answers in
    ``triton.testing.do_bench``'s form: a float without ``quantiles``, else one per quantile."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return ms if quantiles is None else [ms] * len(quantiles)


def run(bench_kernel, strategies, check_model=None, deadline=float("inf"), rows=(48,)):
    from codelens.kernels.lens_triton import default_config

    updates: list[dict] = []
    record = bench_kernel.run_all(
        ["tiny"],
        list(rows),
        strategies,
        default_config(64, True),
        "cpu",
        "synthetic",
        one_call_timer,
        {},
        check_model,
        8,
        deadline,
        lambda r: updates.append(json.loads(json.dumps(r))),
    )
    return record, updates


def test_a_strategy_that_raises_is_recorded_and_the_others_still_run(bench_kernel, monkeypatch):
    real = bench_kernel.strategy_fn

    def strategy_fn(strategy, config):
        if strategy == "triton-chunked":
            raise RuntimeError("injected: CUDA error: an illegal memory access was encountered")
        return real(strategy, config)

    monkeypatch.setattr(bench_kernel, "strategy_fn", strategy_fn)
    record, updates = run(bench_kernel, ["triton-chunked", "triton-fused"], rows=(48, 96))
    by = {(r["strategy"], r["rows"]): r for r in record["results"]}
    assert set(by) == {(s, n) for s in ("triton-fused", "triton-chunked") for n in (48, 96)}
    for n in (48, 96):
        assert by["triton-chunked", n]["error"].startswith("RuntimeError: injected")
        assert by["triton-fused", n]["kernel_ms"] > 0
        assert by["triton-fused", n]["matmul_ms"] > 0
    # One update per timing, each holding everything so far.
    assert [len(u["results"]) for u in updates] == [1, 2, 3, 4]
    [choice] = bench_kernel.choose_defaults(record["results"])
    assert choice["strategy"] == "triton-fused" and set(choice["ms"]) == {"triton-fused"}


def test_a_strategy_that_fails_its_check_is_not_timed(bench_kernel, monkeypatch):
    real = bench_kernel.check

    def check(model, n_tokens, config, device, strategy):
        if strategy == "triton-fused":
            raise AssertionError("injected mismatch")
        return real(model, n_tokens, config, device, strategy)

    monkeypatch.setattr(bench_kernel, "check", check)
    record, _ = run(bench_kernel, ["triton-fused", "triton-chunked"], check_model="tiny")
    checks = {c["strategy"]: c for c in record["checks"]}
    assert checks["triton-fused"] == {
        "strategy": "triton-fused",
        "passed": False,
        "failures": ["AssertionError: injected mismatch"],
    }
    assert checks["triton-chunked"]["passed"] is True  # the real check, at the tiny shape
    assert checks["triton-chunked"]["fp32_vs_torch"]["lse"] < 1e-4
    assert [r["strategy"] for r in record["results"]] == ["triton-chunked"]


def test_the_two_strategies_come_first_then_each_candidate(bench_kernel):
    groups = bench_kernel.strategy_groups(
        ["triton-fused-n256", "triton-chunked", "triton-chunked-v2048", "triton-fused"]
    )
    assert groups == [
        ["triton-fused", "triton-chunked"],
        ["triton-fused-n256"],
        ["triton-chunked-v2048"],
    ]


def test_a_spent_budget_runs_nothing_and_says_so(bench_kernel):
    record, updates = run(
        bench_kernel, ["triton-fused", "triton-chunked"], check_model="tiny", deadline=0.0
    )
    assert record["checks"] == record["results"] == [] and updates == []
    strategies = ("triton-fused", "triton-chunked")
    skipped = [{"strategy": s, "what": "check", "why": "budget"} for s in strategies]
    assert record["skipped"] == skipped


def test_defaults_need_every_shape_of_the_width(bench_kernel):
    def timing(strategy, rows, ms=None, error=None):
        r = {"d": 3584, "rows": rows, "strategy": strategy}
        return r | ({"error": error} if error else {"kernel_ms": ms})

    results = [
        timing("triton-fused", 8192, 1.0),
        timing("triton-fused", 16384, 2.0),
        timing("triton-chunked", 8192, 0.5),  # faster, but failed at the other shape
        timing("triton-chunked", 16384, error="OutOfMemoryError: injected"),
        timing("triton-fused-n256", 8192, 0.4),  # faster, but the budget ran out before 16384
    ]
    [choice] = bench_kernel.choose_defaults(results)
    assert (choice["d"], choice["strategy"], choice["config"]) == (3584, "triton-fused", {})
    assert choice["ms"] == {"triton-fused": [1.0, 2.0]}


def test_the_dispatch_table_from_the_choices(bench_kernel):
    def chose(d, strategy):
        return {"d": d, "strategy": strategy, "config": {}, "ms": {}}

    chosen = [
        chose(3584, "triton-fused"),
        chose(768, "triton-chunked"),
        chose(1536, "triton-chunked"),
        chose(4096, "triton-fused"),
    ]
    table = bench_kernel.strategy_by_width(chosen)
    assert table == "((1536, LensImpl.TRITON_CHUNKED), (1 << 30, LensImpl.TRITON_FUSED),)"
    from codelens.kernels import LensImpl

    rows = eval(table, {"LensImpl": LensImpl})  # the literal is what dispatch.py would hold
    assert rows == ((1536, LensImpl.TRITON_CHUNKED), (1 << 30, LensImpl.TRITON_FUSED))
    assert bench_kernel.strategy_by_width([]) == "()"


def test_the_smoke_timer_answers_like_do_bench(bench_kernel):
    calls = []
    assert isinstance(bench_kernel.wall_clock_timer(lambda: calls.append(1)), float)
    median, low, high = bench_kernel.wall_clock_timer(lambda: None, quantiles=[0.5, 0.2, 0.8])
    assert low <= median <= high
    assert isinstance(bench_kernel.wall_clock_timer(lambda: None, quantiles=[0.5]), float)
    assert len(calls) == 6  # one warm-up, five timed


@pytest.mark.parametrize(
    "registers, warps, shared, ctas",
    [
        (255, 8, 98_304, 1),  # the fused default: 8 warps of 8,192 registers fill the SM
        (255, 4, 73_728, 2),  # 4 warps of 255: two CTAs by registers and by shared memory
        (255, 4, 131_072, 1),  # the same warps, but two CTAs' shared memory would not fit
        (210, 8, 73_728, 1),  # 210 x 32 = 6,720 -> 6,912 per warp: 9 warps, one 8-warp CTA
        (128, 8, 98_304, 2),  # 4,096 per warp: 16 warps
        (64, 4, 2_048, 8),  # the fold kernel: registers allow 8 CTAs of 4 warps
        (32, 1, 0, 32),  # the CTA limit
        (32, 4, 0, 16),  # the warp limit: 64 per SM
    ],
)
def test_ctas_per_sm(bench_kernel, registers, warps, shared, ctas):
    assert bench_kernel.ctas_per_sm(registers, warps, shared) == ctas


def sass_listing(lines: list[str]) -> str:
    """A ``get_sass``-style listing: ``label:`` lines and one ``CTRL<tab>INSTRUCTION`` line per
    instruction."""
    return "\n".join(line if line.endswith(":") else f"  /*ctrl*/\t{line}" for line in lines)


def test_loop_sizes_are_read_off_the_sass(bench_kernel):
    """The K loop (the smallest loop with HGMMA), the tile loop (the largest), an insertion
    round nested in it, and the rest of the tile's epilogue; a shuffle's out-of-line path
    (``BRA.DIV`` to a label inside the tile loop from past its end) is not a round."""
    k_loop = ["K:", *["HGMMA.64x128x16.F32.BF16 R0, gdesc[UR4], R0"] * 4, *["NOP"] * 6, "BRA K"]
    round_ = ["ROUND:", *["FMNMX R1, R1, R2, !PT"] * 11, "BRA ROUND"]
    listing = [
        "TILE:",
        *["NOP"] * 3,
        *k_loop,
        "SHFL:",
        *["FADD R3, R3, R4"] * 20,
        *round_,
        *["FMUL R5, R5, R6"] * 30,
        "BRA TILE",
        *["SHFL.BFLY PT, R7, R7, 0x1, 0x1f"] * 9,
        "BRA.DIV SHFL",
        "EXIT",
    ]
    sizes = bench_kernel.loop_sizes(sass_listing(listing))
    tile = 3 + 11 + 20 + 12 + 30 + 1  # the instructions from TILE: to its branch back
    assert sizes == {
        "tile_loop_instructions": tile,
        "topk_round_instructions": [12],
        "k_loop_instructions": 11,
        "epilogue_per_tile": tile - 11 - 12,
    }


def test_a_cut_sass_listing_gives_no_loop_sizes(bench_kernel):
    listing = ["TILE:", *["HGMMA.64x128x16.F32.BF16 R0, gdesc[UR4], R0"] * 9, "BRA LBB0_7"]
    assert bench_kernel.loop_sizes(sass_listing(listing)) == {"sass_listing_truncated": True}


COMPILE_BOTH = """
import json, sys
sys.path.insert(0, "benchmarks")
import bench_kernel
from codelens.kernels.lens_chunked import LensChunkedConfig

fused = bench_kernel.compile_only(bench_kernel._config_type()())
fold = bench_kernel.compile_fold(LensChunkedConfig())
print(json.dumps([bench_kernel._entry(fused, "triton-fused", "main"),
                  bench_kernel._entry(fold, "triton-chunked", "fold")]))
"""


def test_compile_only_reports_both_kernels_for_sm90():
    """What ``--compile-only --sweep`` writes per entry, for the fused default and the fold
    kernel, compiled for sm_90 here without a GPU (``triton.compile``; in a process of its own,
    since the suite runs Triton's interpreter, which cannot compile)."""
    pytest.importorskip("triton")
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_BOTH], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fused, fold = json.loads(proc.stdout.strip().splitlines()[-1])
    for entry in (fused, fold):
        assert 0 < entry["registers"] <= 255
        assert entry["spill_stores"] >= 0 and entry["sass_instructions"] > 0
        assert entry["ctas_per_sm"] >= 1
        assert entry["topk_round_instructions"] and entry["epilogue_per_tile"] > 0
    assert fused["wgmma"] > 0 and fused["k_loop_instructions"] > 0  # tensor cores, pipelined
    assert fold["wgmma"] == 0  # its GEMM is cuBLAS's
