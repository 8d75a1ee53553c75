"""Does the local executor overlap its stages? End-to-end tokens/s against each stage alone.

One job (a Llama-style model built here with random weights, over standard-library files) is
run three ways into fresh run directories:

* ``sequential``: plan, compute, rows + partials, commit, one after another in one thread (what
  the local executor did before it overlapped its stages);
* ``overlapped``: ``codelens run`` as shipped (planner thread ahead, device work, host thread);
* and its stages alone, timed over the same planned shards: ``plan`` (tokenize, lex, windows),
  ``compute`` (``LensWorker.compute``: forward, capture, lens) and ``host``
  (``LensWorker.finish`` + the commit).

With the stages overlapped, end to end approaches the slowest stage instead of their sum. The
figures are written to ``benchmarks/results/overlap.json`` and ``overlap.md`` (machine, versions,
command). Both runs must give identical rows (checked).

Usage::

    python benchmarks/bench_overlap.py [--files 12] [--layers 8] [--d-model 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from codelens.engine.data.plan import iter_shards
from codelens.engine.model.loading import load_tokenizer
from codelens.engine.run.rundir import RunDir
from codelens.engine.schemas import validate_spec
from codelens.engine.zoo.tiny_models import build_tiny_model
from codelens.workers.bench import provenance, provenance_markdown
from codelens.workers.job import run_job
from codelens.workers.local import LocalExecutor
from codelens.workers.worker import LensWorker


class SequentialExecutor(LocalExecutor):
    """The local executor without overlap: every stage of a shard in turn, in this thread."""

    def run(self, shards, commit, tracker) -> None:
        tracker.workers_alive = 1
        for shard in shards:
            result = self.worker.run_shard(shard)
            commit(result)
            tracker.shard_done(result.n_tokens)


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Bit-identical rows in the same order (NaN payloads included; pyarrow says NaN != NaN)."""
    if a.schema != b.schema or a.num_rows != b.num_rows:
        return False
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_dictionary(x.type) or not pa.types.is_floating(
            getattr(x.type, "value_type", x.type)
        ):
            if not x.equals(y):
                return False
            continue
        flat_x = x.flatten() if hasattr(x, "flatten") else x
        flat_y = y.flatten() if hasattr(y, "flatten") else y
        bits_x = np.asarray(flat_x.to_numpy(zero_copy_only=False)).view(np.uint32)
        bits_y = np.asarray(flat_y.to_numpy(zero_copy_only=False)).view(np.uint32)
        if not np.array_equal(bits_x, bits_y):
            return False
    return True


def spec_for(model_dir: Path, files: list[Path], out: Path) -> Any:
    return validate_spec(
        {
            "model": {"path": str(model_dir), "device": "cpu", "dtype": "float32"},
            "corpus": {"kind": "files", "paths": [str(f) for f in files]},
            "tokens": {"window": 512, "overlap": 64},
            "lens": {"k": 10, "lookahead": [2, 3], "token_sets": {"py": ["def"], "js": ["=>"]}},
            "output": {"dir": str(out), "shard_tokens": 4096},
            "execution": {"backend": "local", "batch_tokens": 4096},
        }
    )


def stage_times(spec: Any) -> dict[str, float]:
    """Each stage alone over the job's shards (plan, compute, host incl. commit)."""
    tokenizer = load_tokenizer(spec.model.path)
    start = time.perf_counter()
    shards = list(iter_shards(spec, tokenizer))
    plan_s = time.perf_counter() - start
    worker = LensWorker(spec)
    worker.load()
    compute_s = host_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir(Path(tmp))
        run_dir.lens_dir.mkdir()
        for shard in shards:
            start = time.perf_counter()
            computed = worker.compute(shard)
            compute_s += time.perf_counter() - start
            start = time.perf_counter()
            result = worker.finish(computed)
            run_dir.commit_shard(result.index, result.table, {"partials": result.partials})
            host_s += time.perf_counter() - start
    worker.shutdown()
    return {"plan": plan_s, "compute": compute_s, "host": host_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="threads for the forward and lens (1 leaves the other cores to the host stages, as "
        "a GPU does; with every core busy in torch there is nothing left to overlap with)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[: args.files]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(
            root / "model", "llama", n_layers=args.layers, d_model=args.d_model
        )
        figures: dict[str, Any] = {}
        tables = {}
        for name, executor_cls in (("sequential", SequentialExecutor), ("overlapped", None)):
            spec = spec_for(model, files, root / name)
            executor = None if executor_cls is None else executor_cls(spec)
            start = time.perf_counter()
            outcome = run_job(spec, show_progress=False, executor=executor)
            wall = time.perf_counter() - start
            status = json.loads((root / name / "_status.json").read_text())
            # The run phase (first shard to last commit), as codelens status reports it: model
            # loading and the counting pass are the same for both and excluded.
            run_s = outcome.tokens_run / status["tokens_per_s"]
            figures[name] = {"tokens": outcome.tokens_run, "seconds": run_s, "wall_s": wall}
            tables[name] = pq.read_table(root / name / "lens")
        same = same_rows(tables["sequential"], tables["overlapped"])
        stages = stage_times(spec_for(model, files, root / "stages"))
    tokens = figures["overlapped"]["tokens"]
    result = {
        "model": {"family": "llama", "layers": args.layers, "d_model": args.d_model},
        "files": args.files,
        "torch_threads": args.torch_threads,
        "tokens": tokens,
        "end_to_end_s": {k: v["seconds"] for k, v in figures.items()},
        "wall_s": {k: v["wall_s"] for k, v in figures.items()},
        "stage_s": stages,
        "tokens_per_s": {
            **{k: tokens / v["seconds"] for k, v in figures.items()},
            **{f"{k} alone": tokens / v for k, v in stages.items()},
        },
        "rows_identical": same,
        **provenance("benchmarks/bench_overlap.py", sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "overlap.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    m = r["model"]
    s = r["stage_s"]
    lines = [
        "# Stage overlap of the local executor",
        "",
        f"Llama-style model, {m['layers']} blocks of width {m['d_model']} (random weights), "
        f"{r['files']} standard-library files, {r['tokens']:,} tokens, k 10, look-ahead [2, 3], "
        f"two token sets, fp32 on the CPU with {r['torch_threads']} torch thread(s).",
        "",
        "| run | seconds | tokens/s |",
        "|---|---|---|",
    ]
    for name, seconds in r["end_to_end_s"].items():
        lines.append(f"| {name}, run phase | {seconds:.2f} | {r['tokens_per_s'][name]:,.0f} |")
    for name, seconds in s.items():
        lines.append(
            f"| {name} alone | {seconds:.2f} | {r['tokens_per_s'][name + ' alone']:,.0f} |"
        )
    total = sum(s.values())
    slowest = max(s.values())
    lines += [
        "",
        f"Sum of the stages {total:.2f} s, slowest stage {slowest:.2f} s: overlapped end to end is "
        f"{r['end_to_end_s']['overlapped'] / slowest:.2f}x the slowest stage, sequential "
        f"{r['end_to_end_s']['sequential'] / slowest:.2f}x. Rows identical between the two runs: "
        f"{r['rows_identical']}.",
        "",
        *provenance_markdown(r),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
