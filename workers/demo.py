"""``codelens demo OUT_DIR``: the main job on the embedded default, with nothing to download.

It builds a small Llama-style model locally (random weights and a byte-level BPE tokenizer trained
on standard-library files) into ``OUT_DIR/model``, writes ``OUT_DIR/job.yaml`` over a deterministic
sample of the running Python's standard library, and runs it into ``OUT_DIR/run``. The job file
is an ordinary spec: ``codelens run OUT_DIR/job.yaml`` reruns (resumes) it.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import yaml

from codelens.engine.schemas import load_spec
from codelens.engine.tiny_models import build_tiny_model
from codelens.workers.job import JobOutcome, run_job

DEMO_FAMILY = "llama"
DEMO_LAYERS = 4
DEMO_D_MODEL = 64
DEMO_MAX_FILE_BYTES = 40_000


def stdlib_sample(n_files: int) -> list[Path]:
    """``n_files`` standard-library modules, evenly spaced over the sorted list (deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted(
        p for p in stdlib.glob("*.py") if 2_000 <= p.stat().st_size <= DEMO_MAX_FILE_BYTES
    )
    if not candidates:
        raise FileNotFoundError(f"no standard-library sources found under {stdlib}")
    n = min(n_files, len(candidates))
    step = len(candidates) / n
    return [candidates[int(i * step)] for i in range(n)]


def demo_spec_data(out_dir: Path, files: list[Path]) -> dict[str, Any]:
    """The demo job spec as plain data (written to ``OUT_DIR/job.yaml``)."""
    return {
        "schema_version": 1,
        "name": "demo",
        "model": {"path": str(out_dir / "model"), "dtype": "float32", "device": "auto"},
        "corpus": {"kind": "files", "paths": [str(p) for p in files]},
        "tokens": {"window": 256, "overlap": 32, "add_bos": True},
        "lens": {
            "layers": "all",
            "k": 5,
            "lookahead": [2, 3],
            "token_sets": {"keywords": ["def", "return", "import", "class", "self"]},
        },
        "output": {"dir": str(out_dir / "run"), "shard_tokens": 8192},
        "execution": {"backend": "local", "batch_tokens": 4096},
    }


def run_demo(out_dir: Path, *, n_files: int = 24) -> tuple[JobOutcome, dict[str, Any]]:
    """Build the model if needed, write the job, run it; returns the outcome and summary.json."""
    out_dir = Path(out_dir).resolve()
    model_dir = out_dir / "model"
    if not (model_dir / "model.safetensors").exists():
        build_tiny_model(model_dir, DEMO_FAMILY, n_layers=DEMO_LAYERS, d_model=DEMO_D_MODEL, seed=0)
    job_file = out_dir / "job.yaml"
    job_file.write_text(yaml.safe_dump(demo_spec_data(out_dir, stdlib_sample(n_files)), sort_keys=False))
    outcome = run_job(load_spec(job_file))
    summary = json.loads((out_dir / "run" / "summary.json").read_text())
    return outcome, summary
