"""Padding computed per real token: windows batched in window order vs longest first.

A forward pass over a batch computes ``len(batch) * longest`` positions; every position past a
window's own length is padding, computed and thrown away. ``ShardRunner.compute`` batches a
shard's windows longest first (``runner.by_length``) and puts the statistics back in window order.
This script plans real corpora with the job defaults (window 1024, overlap 128, shards of 65,536
tokens, ``batch_tokens`` 8192), counts the padded positions both ways (exact), and times the
device work of the first shards both ways on the bundled model on this CPU (the same batches
through ``LensPipeline``; what a forward costs scales with its padded positions).

Corpora: the standard library's top-level modules (long files: mostly full windows), and its
packages' modules with its test suite (many short files: ``__init__``, small modules, tests).

Writes ``benchmarks/results/padding.json`` and ``padding.md`` (machine, versions, command).

Usage::

    python benchmarks/bench_padding.py [--time-shards 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from codelens.engine.data.plan import iter_shards
from codelens.engine.model.loading import load_model
from codelens.engine.run.pipeline import LensPipeline
from codelens.engine.run.request import resolve_lens
from codelens.engine.run.runner import batches, by_length
from codelens.engine.schemas import JobSpec
from codelens.engine.zoo.default_model import default_model_dir
from codelens.workers.bench import provenance, provenance_markdown

CORPORA = {
    "stdlib top-level modules": ["*.py"],
    "stdlib packages and tests": ["*/*.py", "test/**/*.py"],
}


def padded(groups: list[list[Any]]) -> int:
    return sum(len(b) * max(len(w.input_ids) for w in b) for b in groups)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-shards", type=int, default=2, help="shards timed per corpus")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    loaded = load_model(default_model_dir(), device="cpu")
    results: dict[str, Any] = {}
    for name, globs in CORPORA.items():
        spec = JobSpec.model_validate(
            {
                "name": "padding",
                "model": {"path": str(default_model_dir())},
                "corpus": {"paths": [str(stdlib / g) for g in globs]},
                "output": {"dir": "/tmp/unused"},
            }
        )
        pipeline = LensPipeline(loaded, resolve_lens(spec.lens, loaded))
        budget = spec.execution.batch_tokens
        real = in_order = longest_first = 0
        seconds = {"window order": 0.0, "longest first": 0.0}
        for i, shard in enumerate(iter_shards(spec, loaded.tokenizer)):
            windows = list(shard.windows)
            sorted_windows = [windows[j] for j in by_length(windows)]
            real += sum(len(w.input_ids) for w in windows)
            in_order += padded(batches(windows, budget))
            longest_first += padded(batches(sorted_windows, budget))
            if i < args.time_shards:
                for label, ws in (("window order", windows), ("longest first", sorted_windows)):
                    start = time.perf_counter()
                    for group in batches(ws, budget):
                        pipeline(group)
                    seconds[label] += time.perf_counter() - start
        results[name] = {
            "input_tokens": real,
            "computed_per_input_token": {
                "window order": in_order / real,
                "longest first": longest_first / real,
            },
            "timed_shards": args.time_shards,
            "device_seconds": seconds,
        }
    result = {
        "corpora": results,
        "settings": {"window": 1024, "overlap": 128, "shard_tokens": 65536, "batch_tokens": 8192},
        "model": "bundled default (CPU, float32)",
        "torch_threads": torch.get_num_threads(),
        **provenance("benchmarks/bench_padding.py", sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "padding.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "padding.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Padding: windows batched in window order vs longest first",
        "",
        "Positions a forward pass computes per input token (1.00 = no padding), with the job "
        "defaults (window 1024, overlap 128, shards of 65,536 tokens, batch_tokens 8192), and the "
        f"device work of the first {next(iter(r['corpora'].values()))['timed_shards']} shards "
        f"of each corpus on the {r['model']}, {r['torch_threads']} torch threads.",
        "",
        "| corpus | input tokens | window order | longest first | seconds, window order | "
        "seconds, longest first |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in r["corpora"].items():
        per, s = c["computed_per_input_token"], c["device_seconds"]
        lines.append(
            f"| {name} | {c['input_tokens']:,} | {per['window order']:.3f} | "
            f"{per['longest first']:.3f} | {s['window order']:.2f} | {s['longest first']:.2f} |"
        )
    lines += [
        "",
        *provenance_markdown(r),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
