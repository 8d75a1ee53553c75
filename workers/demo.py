"""``codelens demo OUT_DIR``: the main job on the embedded default, with nothing to download.

The model is the bundled ``codelens-stdlib-py`` (a 4-layer Llama-style code LM trained from scratch
on the CPython standard library, shipped as package data: see
``codelens.engine.zoo.default_model`` and its ``MODEL_CARD.md``). The demo copies it to
``OUT_DIR/model`` (so ``codelens plot --model OUT_DIR/model`` works too), writes
``OUT_DIR/job.yaml`` over a deterministic sample of the running Python's standard library,
*held-out files only* (the model never saw them), runs it into ``OUT_DIR/run`` and writes the
HTML report into ``OUT_DIR/run/report``. The job file is an ordinary spec:
``codelens run OUT_DIR/job.yaml`` reruns (resumes) it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from codelens.engine.schemas import load_spec
from codelens.engine.zoo.default_model import default_model_dir, held_out_sample
from codelens.workers.job import JobOutcome, run_job

DEMO_MAX_FILE_BYTES = 40_000
DEMO_MIN_FILE_BYTES = 2_000

MODEL_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "MODEL_CARD.md",
)
"""Files of the bundled model that the demo copies to ``OUT_DIR/model``."""


def stdlib_sample(n_files: int) -> list[Path]:
    """``n_files`` held-out standard-library files, evenly spaced over the sorted list."""
    return held_out_sample(n_files, min_bytes=DEMO_MIN_FILE_BYTES, max_bytes=DEMO_MAX_FILE_BYTES)


def install_model(model_dir: Path) -> Path:
    """Copy the bundled model to ``model_dir`` (files that differ or are missing only)."""
    src = default_model_dir()
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        s, d = src / name, model_dir / name
        if not s.exists():
            if name == "MODEL_CARD.md":
                continue
            raise FileNotFoundError(f"the bundled model is incomplete: {s} is missing")
        if not d.exists() or d.read_bytes() != s.read_bytes():
            shutil.copyfile(s, d)
    return model_dir


def demo_spec_data(out_dir: Path, files: list[Path]) -> dict[str, Any]:
    """The demo job spec as plain data (written to ``OUT_DIR/job.yaml``)."""
    return {
        "schema_version": 1,
        "name": "demo",
        # "auto" is float32 on a CPU (the bf16 weights are upcast), the checkpoint's dtype on a GPU.
        "model": {"path": str(out_dir / "model"), "dtype": "auto", "device": "auto"},
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


def write_demo_report(run_dir: Path) -> Path | None:
    """The HTML report of the run (``codelens report``), or None if it cannot be drawn here."""
    try:
        from codelens.engine.analysis.report import build_report
    except ImportError:  # an install without the report module
        return None
    try:
        return build_report(run_dir)
    except ImportError:  # matplotlib missing: the run itself is complete
        return None


def run_demo(out_dir: Path, *, n_files: int = 24) -> tuple[JobOutcome, dict[str, Any]]:
    """Copy the bundled model, write the job, run it, write the report.

    Returns:
        The outcome and ``summary.json``.
    """
    out_dir = Path(out_dir).resolve()
    install_model(out_dir / "model")
    job_file = out_dir / "job.yaml"
    spec_data = demo_spec_data(out_dir, stdlib_sample(n_files))
    job_file.write_text(yaml.safe_dump(spec_data, sort_keys=False))
    outcome = run_job(load_spec(job_file))
    run_dir = out_dir / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    index = write_demo_report(run_dir)
    if index is not None:
        print(f"report: {index}")
    return outcome, summary
