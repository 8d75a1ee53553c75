"""The one prepared GPU check: kernel tests, kernel timings and the end-to-end pipeline, in one
command sized for a lent machine's single call, with a summary printed last.

Three stages, each a subprocess with its share of ``--budget-s`` (time a stage does not use goes
to the ones after it), each writing its figures as it goes, so that a stage stopped by its time
limit, or one that fails, keeps what it measured and the next stage still runs:

1. **tests**: the kernel oracle tests (``tests/kernels/test_lens_triton.py``,
   ``test_final_mixture.py``) compiled for the GPU instead of Triton's CPU interpreter, the TF32
   test of fp32 heads, and ``test_lens_torch.py`` (with its CUDA-only test); with
   ``--confcutdir tests/kernels``, whose conftest moves their CPU-built inputs to the GPU (the
   suite's top-level conftest and its dependencies are not needed), spread over ``-n`` processes
   when pytest-xdist is there (the Triton compiles dominate);
2. **kernel**: ``bench_kernel.py --check --source forward``: both strategies and the candidate
   configurations checked against the torch path at a Qwen2.5-Coder-7B production shape, then
   timed against the cuBLAS bf16 matmul at the GPT-2, Qwen2.5-Coder-1.5B, CodeLlama-7B and
   Qwen2.5-Coder-7B shapes (16k rows each) on the residual rows of a random-weight model's forward
   (near worst case for the top-k), the two strategies first; it names the default per width
   (what ``kernels/dispatch.py``'s ``STRATEGY_BY_WIDTH`` should then say);
3. **pipeline**: ``bench_gpu_pipeline.py``: end-to-end tokens/s, compute-only tokens/s and the
   share of the run the GPU is busy, on random-weight Qwen2.5-Coder-1.5B and 7B models run
   through ``codelens run``'s own path (needs pydantic: on the lent machine, carried wheels).

Everything lands in ``--out`` (``$OUT`` when set, as on the lent machine; else
``benchmarks/results``): ``gpu_check.log`` (every stage's output), ``gpu_check-summary.json`` and
``.md``, ``kernel-<device>-<time>.json`` and ``.md``, ``gpu_pipeline.json`` and ``.md``: seven
files, within the eight a lent machine's call returns.

``--device cpu`` is the smoke run of the same three stages on a machine without a GPU (a few
tests in the interpreter, ``bench_kernel --device cpu``, ``bench_gpu_pipeline --device cpu``,
about a minute), written to a temporary folder unless ``--out``:
``tests/benchmarks/test_scripts.py`` runs it, so the one GPU call does not meet a broken script.

Usage: ``bash benchmarks/gpu_check.sh`` (sets up the package links and carried wheels, then runs
this), or ``python benchmarks/gpu_check.py --stages kernel --budget-s 200`` to rerun one stage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tests", "kernel", "pipeline")
SHARES = {"tests": 0.15, "kernel": 0.37, "pipeline": 0.48}
"""Each stage's share of the budget (of what is left when it starts, with the later stages'
shares), from estimates for an H200: the tests ~60 s (~300 Triton compiles over 14 processes),
the kernel stage ~170 s (~40 compiles, 7 checks at the 7B shape, ~40 timings), the pipeline
~220 s (two models built, saved, loaded and run over ``PIPELINE_TOKENS`` tokens each)."""
GRACE_S = {"tests": 30, "kernel": 30, "pipeline": 60}
"""A stage is killed this long after its share: the kernel and pipeline stages stop starting new
work at their budget but finish what runs (the pipeline kills a shape 45 s past its own deadline,
and then still writes its figures). With the default budget the command takes at most
450 + 120 s, ~460 s when no stage overruns."""
PIPELINE_TOKENS = 131_072
"""Tokens per shape of the pipeline stage on a GPU (4 shards of 32k: the first, and 3 of steady
state); ``bench_gpu_pipeline.py`` alone defaults to twice that."""
KERNEL_TESTS = (
    "tests/kernels/test_lens_triton.py",
    "tests/kernels/test_final_mixture.py",
    "tests/kernels/test_lens_torch.py",  # its CUDA-only test: no host sync in the chunk loop
)
SMOKE_TESTS = "test_bitwise_deterministic or test_final_mixture_matches_float64"
"""The CPU smoke run's test selection: one test of each file (the interpreter is slow)."""


def stage_command(stage: str, device: str, budget_s: float, out: Path) -> list[str]:
    """The command line of one stage; ``budget_s`` is the stage's share."""
    py = sys.executable
    if stage == "tests":
        cmd = [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
        cmd += ["--confcutdir", "tests/kernels", *KERNEL_TESTS]
        if device == "cpu":
            return [*cmd, "-k", SMOKE_TESTS]
        cmd += ["-k", "not codelens_run"]  # that one needs the whole suite's set-up
        if importlib.util.find_spec("xdist") is not None:  # the compiles are single-threaded
            cmd += ["-n", str(max(1, min(14, (os.cpu_count() or 1) - 2)))]
        return cmd
    if stage == "kernel":
        cmd = [py, "benchmarks/bench_kernel.py", "--check", "--source", "forward"]
        cmd += ["--budget-s", f"{budget_s:.0f}", "--out-dir", str(out)]
        cmd += ["--strategies", "triton-fused", "triton-chunked"]
        if device == "cpu":
            return [*cmd, "--device", "cpu"]
        # Most promising first (topk_rounds.md's predictions): the budget may end the list.
        cmd += ["triton-fused-n256", "triton-fused-n64", "triton-fused-c16384"]
        cmd += ["triton-chunked-r8192", "triton-fused-slot-kl", "triton-chunked-v2048"]
        cmd += ["triton-fused-m64n256"]
        return [*cmd, "--check-tokens", "64", "--rows", "16384", "--warmup", "10", "--rep", "25"]
    if stage == "pipeline":
        cmd = [py, "benchmarks/bench_gpu_pipeline.py", "--budget-s", f"{budget_s:.0f}"]
        if device == "cuda":
            cmd += ["--tokens", str(PIPELINE_TOKENS)]
        return [*cmd, "--device", device, "--out", str(out)]
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")


def run_stage(cmd: list[str], timeout_s: float, env: dict[str, str], log) -> dict[str, Any]:
    """Run ``cmd`` in the repository root, its output echoed and appended to ``log``; its
    process group is killed ``timeout_s`` after the start (a watchdog: a stage may go quiet)."""
    log.write(f"\n== {shlex.join(cmd)}\n")
    log.flush()
    print(f"\n== {shlex.join(cmd)}", flush=True)
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=12)  # for the summary
    killed = threading.Event()
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the watchdog kills its children too
    ) as proc:

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                tail.append(line)
            proc.wait()
        finally:
            watchdog.cancel()
    if killed.is_set():
        log.write(f"\n== killed after {timeout_s:.0f} s\n")
    return {
        "command": shlex.join(cmd),
        "returncode": proc.returncode,
        "timed_out": killed.is_set(),
        "seconds": round(time.monotonic() - started, 1),
        "tail": "".join(tail),
    }


def test_counts(text: str) -> dict[str, int]:
    """pytest's closing line (``3 failed, 70 passed, 2 skipped in 1.2s``) as counts."""
    counts = {}
    for number, word in re.findall(
        r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", text
    ):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def newest(out: Path, pattern: str, since: float) -> Path | None:
    """The newest file in ``out`` matching ``pattern`` written after ``since`` (epoch s)."""
    found = [p for p in out.glob(pattern) if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def kernel_summary(path: Path | None) -> dict[str, Any] | None:
    """The kernel stage's figures: checks, each timing's fraction of the matmul, the defaults."""
    if path is None:
        return None
    record = json.loads(path.read_text())
    return {
        "file": path.name,
        "checks": {c["strategy"]: c["passed"] for c in record["checks"]},
        "fraction_of_matmul": [
            {
                "model": r["model"],
                "strategy": r["strategy"],
                "kernel_ms": r.get("kernel_ms"),
                "matmul_ms": r.get("matmul_ms"),
                "fraction": r.get("fraction_of_matmul"),
                **({"error": r["error"]} if "error" in r else {}),
            }
            for r in record["results"]
        ],
        "defaults": [
            {"d": c["d"], "strategy": c["strategy"], "config": c["config"]}
            for c in record["meta"].get("defaults", [])
        ],
        "strategy_by_width": record["meta"].get("strategy_by_width"),
        "not_run": record["skipped"],
    }


def pipeline_summary(path: Path | None) -> dict[str, Any] | None:
    """The pipeline stage's headline figures per shape (``gpu_pipeline.json`` has the rest)."""
    if path is None:
        return None
    shapes = {}
    for name, x in json.loads(path.read_text()).get("shapes", {}).items():
        if x.get("state") != "done":
            shapes[name] = {"state": x.get("state"), "error": x.get("error")}
            continue
        e, c = x["end_to_end"], x["compute_only"]
        shapes[name] = {
            "state": "done",
            "tokens": e["tokens"],
            "end_to_end_tokens_per_s": e["tokens_per_s"],
            "steady_tokens_per_s": e["steady_tokens_per_s"],
            "compute_only_tokens_per_s": c["tokens_per_s"],
            "compute_over_end_to_end": x.get("compute_over_end_to_end"),
            "gpu_busy_pct_run": e.get("gpu_busy_mean_pct"),
            "gpu_busy_pct_compute_only": c.get("gpu_busy_mean_pct"),
        }
    return {"file": path.name, "shapes": shapes}


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# GPU check on {summary['device']}",
        "",
        f"- command: `{summary['command']}`",
        f"- written (UTC): {summary['written_at']}; budget {summary['budget_s']:.0f} s, "
        f"took {summary['seconds']:.0f} s",
        f"- python {summary['python']}; package versions are in each stage's own results",
        "",
        "| stage | result | seconds |",
        "|---|---|---|",
    ]
    for name, stage in summary["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', '')} |")
    tests = summary["stages"].get("tests", {})
    if tests.get("counts"):
        lines += ["", "Kernel tests: " + ", ".join(f"{v} {k}" for k, v in tests["counts"].items())]
    kernel = summary.get("kernel")
    if kernel:
        lines += ["", f"## Kernels (`{kernel['file']}`)", ""]
        lines += [f"- checks: {kernel['checks']}"]
        lines += ["", "| model | strategy | kernel ms | matmul ms | kernel / matmul |"]
        lines += ["|---|---|---|---|---|"]
        for r in kernel["fraction_of_matmul"]:
            frac = r.get("fraction")
            shown = r.get("error") or ("n/a" if frac is None else f"{frac:.2f}")
            ms = r.get("kernel_ms")
            mm = r.get("matmul_ms")
            lines.append(
                f"| {r['model']} | {r['strategy']} | {'' if ms is None else f'{ms:.2f}'} "
                f"| {'' if mm is None else f'{mm:.2f}'} | {shown} |"
            )
        for c in kernel["defaults"]:
            config = f" with {c['config']}" if c["config"] else ""
            lines.append(f"\nDefault for d = {c['d']}: **{c['strategy']}**{config}")
        if kernel["strategy_by_width"]:
            lines.append(
                f"\n`STRATEGY_BY_WIDTH = {kernel['strategy_by_width']}` (kernels/dispatch.py)"
            )
        if kernel["not_run"]:
            lines.append(f"\nNot run (budget): {len(kernel['not_run'])} checks or timings")
    pipeline = summary.get("pipeline")
    if pipeline:
        lines += ["", f"## End to end (`{pipeline['file']}`)", ""]
        lines += [
            "| shape | tokens | end to end tok/s | steady tok/s | compute only tok/s "
            "| compute / end to end | GPU busy, run | GPU busy, compute only |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, x in pipeline["shapes"].items():
            if x["state"] != "done":
                lines.append(f"| {name} | {x['state']}: {x.get('error')} |" + " |" * 6)
                continue
            cells = [x["tokens"], x["end_to_end_tokens_per_s"], x["steady_tokens_per_s"]]
            cells += [x["compute_only_tokens_per_s"], x["compute_over_end_to_end"]]
            cells += [x["gpu_busy_pct_run"], x["gpu_busy_pct_compute_only"]]
            shown = ["n/m" if c is None else f"{c:,.3g}" if c < 100 else f"{c:,.0f}" for c in cells]
            lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450,
        help="the whole command's time, stages' grace aside (default 450: one call of a lent "
        "machine, timeout_s 590)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, help="default: $OUT, else benchmarks/results")
    args = parser.parse_args(argv)
    started, started_epoch = time.monotonic(), time.time()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; --device cpu is the smoke run of this script")
            return 2
        device_name = torch.cuda.get_device_name()
    else:
        device_name = "cpu (smoke run)"
    if args.out is not None:
        out = args.out
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
    elif args.device == "cpu":
        out = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    else:
        out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    summary: dict[str, Any] = {
        "device": device_name,
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "budget_s": args.budget_s,
        "stages": {},
    }
    with open(out / "gpu_check.log", "a") as log:
        for i, stage in enumerate(args.stages):
            left = args.budget_s - (time.monotonic() - started)
            later = sum(SHARES[s] for s in args.stages[i:])
            share = left * SHARES[stage] / later
            if stage == "pipeline" and importlib.util.find_spec("pydantic") is None:
                summary["stages"][stage] = {
                    "status": "not run: pydantic is not importable (on the lent machine, carry "
                    "its wheels: bench_gpu_pipeline.py's docstring)"
                }
                continue
            if share < 20:
                summary["stages"][stage] = {"status": f"not run: {left:.0f} s left"}
                continue
            cmd = stage_command(stage, args.device, share, out)
            result = run_stage(cmd, share + GRACE_S[stage], env, log)
            if result["timed_out"]:
                result["status"] = f"killed at {share + GRACE_S[stage]:.0f} s"
            else:
                result["status"] = "passed" if result["returncode"] == 0 else "failed"
            if stage == "tests":
                result["counts"] = test_counts(result["tail"])
            summary["stages"][stage] = result
    summary["kernel"] = kernel_summary(newest(out, "kernel-*.json", started_epoch))
    summary["pipeline"] = pipeline_summary(newest(out, "gpu_pipeline.json", started_epoch))
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["written_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / "gpu_check-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    page = _markdown(summary)
    (out / "gpu_check-summary.md").write_text(page)
    print("\n" + page)
    print(f"gpu_check: results in {out}")
    return 0 if all(s["status"] == "passed" for s in summary["stages"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
