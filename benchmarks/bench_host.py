"""Host time per lens row: what a worker spends on the CPU for each row after the device is done.

The host path of one shard, stage by stage, on synthetic statistics at a production row shape
(default: Qwen2.5-Coder-7B, 28 blocks -> 29 rows per token, k 10, look-ahead [2, 3], two token
sets), with real windows: real source files tokenized and lexed by the planner, so the span and
category columns and the groupings of the partials are what a run sees.

Stages (``codelens.engine.run``): ``assemble`` (``LensBatch.assemble``: the batches the device
returned, longest windows first at 8192 tokens, put in window order), ``rows``
(``rows.lens_table``: the Arrow table), ``partials``
(``aggregates.shard_partials``), ``commit`` (``RunDir.commit_shard``: Parquet encode, fsync,
rename, manifest line); plus ``plan`` (tokenize, lex, window: ``data.plan.plan_windows``) per row.
Beside them, what the Ray driver spends per shard now that workers write their parts
(``RunDir.commit_part`` of a staged part: rename, fsyncs, manifest line).
Each is timed on one thread (torch, Arrow and the planner), median of ``--repeats``; the figure is
microseconds per row. The issue's target is at most 1 us of host time per row per core.

Writes ``benchmarks/results/host_path.json`` and ``host_path.md`` (machine, versions, command).

Usage::

    python benchmarks/bench_host.py [--tokens 8192] [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from codelens.engine.data.corpus import Document
from codelens.engine.data.plan import plan_windows
from codelens.engine.run.aggregates import shard_partials
from codelens.engine.run.pipeline import LensBatch
from codelens.engine.run.request import BLOCK_SITE, ResolvedLens
from codelens.engine.run.rows import lens_table
from codelens.engine.run.rundir import RunDir, manifest_line, write_part
from codelens.engine.run.runner import batches, by_length
from codelens.engine.schemas import LensSpec, TokensSpec
from codelens.engine.zoo.tiny_models import build_tiny_tokenizer
from codelens.kernels import LensImpl, LensRequest, LensStats
from codelens.workers.bench import provenance, provenance_markdown

SHAPES = {
    "qwen2.5-coder-7b": {"n_blocks": 28, "vocab": 152_064},
    "qwen2.5-coder-1.5b": {"n_blocks": 28, "vocab": 151_936},
    "codellama-7b": {"n_blocks": 32, "vocab": 32_016},
}
LENS = LensSpec(k=10, lookahead=[2, 3], token_sets={"js": ["function"], "py": ["def"]})


def corpus_windows(n_files: int, tokenizer: Any) -> list:
    """Every window (ids, targets, spans) of the first ``n_files`` standard-library files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:n_files]
    documents = [
        Document(i, p.name, p.read_text(errors="replace"), "python", "ok")
        for i, p in enumerate(files)
    ]
    return list(plan_windows(documents, tokenizer, TokensSpec(window=1024, overlap=128), [2, 3]))


def first_tokens(windows: list, n_tokens: int) -> list:
    """The first windows that emit at least ``n_tokens`` tokens."""
    out, total = [], 0
    for w in windows:
        out.append(w)
        total += w.n_emit
        if total >= n_tokens:
            break
    return out


def synthetic_lens(n_blocks: int) -> ResolvedLens:
    """The resolved request of a ``lens.layers: all`` job on an ``n_blocks`` model."""
    layers = tuple(range(n_blocks + 1))
    return ResolvedLens(
        spec=LENS,
        n_blocks=n_blocks,
        layers=layers,
        captured=layers,
        attn_layers=(),
        attn_modules=None,
        rows=tuple((BLOCK_SITE, layer, layer) for layer in layers),
        decoded_slots=(),
        request=LensRequest(k=LENS.k),
        impl=LensImpl.TORCH,
        token_set_ids={"js": [1], "py": [2]},
        pad_id=0,
    )


def synthetic_batch(windows: list, n_rows: int, vocab: int, seed: int = 0) -> LensBatch:
    """Statistics shaped as the lens returns them, with plausible values (top-1 agreeing with the
    final layer more often in later layers, so the convergence histograms are not degenerate)."""
    gen = torch.Generator().manual_seed(seed)
    t = sum(w.n_emit for w in windows)
    k, a, s = LENS.k, len(LENS.lookahead), len(LENS.token_sets)
    final = torch.randint(0, vocab, (t,), generator=gen, dtype=torch.int32)
    topk = torch.randint(0, vocab, (n_rows, t, k), generator=gen, dtype=torch.int32)
    agree = torch.rand(n_rows, t, generator=gen) < torch.linspace(0.05, 1.0, n_rows)[:, None]
    topk[..., 0] = torch.where(agree, final, topk[..., 0])
    stats = LensStats(
        lse=torch.randn(n_rows, t, generator=gen) * 3 + 10,
        entropy=torch.rand(n_rows, t, generator=gen) * 6,
        kl_final=torch.rand(n_rows, t, generator=gen) * 4,
        target_logprob=-torch.rand(n_rows, t, generator=gen) * 12,
        target_rank=torch.randint(0, vocab, (n_rows, t), generator=gen, dtype=torch.int32),
        topk_ids=topk,
        topk_logprobs=-torch.rand(n_rows, t, k, generator=gen).sort(-1).values * 10,
        ahead_logprob=-torch.rand(n_rows, t, a, generator=gen) * 12,
        ahead_rank=torch.randint(0, vocab, (n_rows, t, a), generator=gen, dtype=torch.int32),
        set_logmass=-torch.rand(n_rows, t, s, generator=gen) * 8,
        finite=torch.ones(n_rows, t, dtype=torch.bool),
    )
    targets = torch.from_numpy(np.concatenate([w.targets for w in windows])).long()
    token_ids = torch.tensor([i for w in windows for i in w.input_ids[-w.n_emit :]])
    return LensBatch(tuple(windows), stats, token_ids, targets)


BATCH_TOKENS = 8192  # execution.batch_tokens of the GPU benchmarks


def as_batches(shard: LensBatch) -> tuple[list[LensBatch], tuple[int, ...]]:
    """``shard`` as the device returns it: its windows batched longest first (``by_length``,
    ``batches`` at ``BATCH_TOKENS``), and where each window went (``ShardStats.order``)."""
    order = by_length(shard.inputs)
    longest_first = LensBatch.assemble([shard], order)
    out, first_input, first_token = [], 0, 0
    for group in batches(longest_first.inputs, BATCH_TOKENS):
        n = sum(x.n_emit for x in group)
        stats = {}
        for f in fields(LensStats):
            value = getattr(longest_first.stats, f.name)
            stats[f.name] = None if value is None else value.narrow(1, first_token, n)
        out.append(
            LensBatch(
                longest_first.inputs[first_input : first_input + len(group)],
                LensStats(**stats),
                longest_first.token_ids.narrow(0, first_token, n),
                longest_first.targets.narrow(0, first_token, n),
            )
        )
        first_input, first_token = first_input + len(group), first_token + n
    return out, tuple(sorted(range(len(order)), key=order.__getitem__))


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_seconds_of(setup, fn, repeats: int) -> float:
    """Median time of ``fn(setup())``, ``setup`` untimed."""
    times = []
    for _ in range(repeats):
        prepared = setup()
        start = time.perf_counter()
        fn(prepared)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _staged(run_dir: RunDir, shard: int, table: pa.Table) -> tuple[int, Path]:
    """A part as a Ray worker leaves it for the driver: written to its staging path."""
    staged = run_dir.staging_path(shard, "bench")
    write_part(table, staged)
    return shard, staged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-coder-7b")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per shard")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--files", type=int, default=40, help="stdlib files the planner reads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    shape = SHAPES[args.shape]
    tokenizer = build_tiny_tokenizer()
    every = corpus_windows(args.files, tokenizer)
    plan_s = median_seconds(lambda: corpus_windows(args.files, tokenizer), args.repeats)
    plan_tokens = sum(w.n_emit for w in every)
    windows = first_tokens(every, args.tokens)
    lens = synthetic_lens(shape["n_blocks"])
    n_kinds = len(lens.rows)
    batch = synthetic_batch(windows, n_kinds, shape["vocab"])
    n_tokens = batch.token_ids.shape[0]
    n_rows = n_tokens * n_kinds

    table = lens_table(lens, batch)
    partials = shard_partials(lens, batch)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir(Path(tmp))
        run_dir.lens_dir.mkdir()
        entry = {"n_tokens": n_tokens, "rows": n_rows, "partials": partials}
        shard = iter(range(1 << 30))
        device_batches, order = as_batches(batch)
        stages = {
            "plan (tokenize, lex, window)": plan_s * n_tokens / plan_tokens,
            "assemble (window order)": median_seconds(
                lambda: LensBatch.assemble(device_batches, order), args.repeats
            ),
            "rows (Arrow table)": median_seconds(lambda: lens_table(lens, batch), args.repeats),
            "partials (summary aggregates)": median_seconds(
                lambda: shard_partials(lens, batch), args.repeats
            ),
            "commit (Parquet + manifest)": median_seconds(
                lambda: run_dir.commit_shard(next(shard), table, entry), args.repeats
            ),
        }
        part_bytes = run_dir.part_path(0).stat().st_size
        line = manifest_line(0, entry)  # encoded by the worker, with the part
        driver_commit = median_seconds_of(
            lambda: _staged(run_dir, next(shard), table),
            lambda staged: run_dir.commit_part(staged[0], staged[1], line),
            args.repeats,
        )
    per_row = {name: s / n_rows * 1e6 for name, s in stages.items()}
    result = {
        "shape": args.shape,
        "rows_per_token": n_kinds,
        "tokens": n_tokens,
        "rows": n_rows,
        "seconds": stages,
        "us_per_row": per_row,
        "us_per_row_total": sum(per_row.values()),
        "part_bytes_per_row": part_bytes / n_rows,
        # Under Ray the worker writes the part (the commit stage above, on the worker's host) and
        # the driver only renames it and appends the manifest line: its cost per shard.
        "driver_seconds_per_shard": {
            "writes the part (before)": stages["commit (Parquet + manifest)"],
            "renames a staged part (now)": driver_commit,
        },
        "threads": 1,
        **provenance("benchmarks/bench_host.py", sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_path.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "host_path.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Host time per lens row",
        "",
        f"Shape {r['shape']}: {r['rows_per_token']} rows per token (k 10, look-ahead [2, 3], two "
        f"token sets), one shard of {r['tokens']:,} tokens = {r['rows']:,} rows, synthetic "
        "statistics over real planned windows. One thread for torch, Arrow and the planner.",
        "",
        "| stage | seconds per shard | us per row |",
        "|---|---|---|",
    ]
    for name, seconds in r["seconds"].items():
        lines.append(f"| {name} | {seconds:.3f} | {r['us_per_row'][name]:.3f} |")
    lines += [
        f"| **total** | {sum(r['seconds'].values()):.3f} | **{r['us_per_row_total']:.3f}** |",
        "",
        f"Part file: {r['part_bytes_per_row']:.1f} bytes per row.",
        "",
        "The Ray driver's share of a commit, per shard (workers write their own parts; before, "
        "the driver wrote every part itself):",
        "",
        "| the driver | seconds per shard |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in r["driver_seconds_per_shard"].items()),
        "",
        *provenance_markdown(r),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
