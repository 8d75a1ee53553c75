"""``codelens demo OUT_DIR``: the main job on the embedded default, with nothing to download.

The model is the bundled ``codelens-debian-code`` (an 8-layer Llama-style code LM trained from
scratch on Python, C, Perl and shell code that a Debian machine ships, packaged as package data:
see ``codelens.engine.zoo.default_model`` and its ``MODEL_CARD.md``). The demo copies it to
``OUT_DIR/model`` (so ``codelens plot --model OUT_DIR/model`` works too), writes
``OUT_DIR/job.yaml`` over a deterministic sample of *held-out* files of every language this
machine has (the model never saw them), with one token set per language (its Pygments keywords
that are one token, shared words removed) so that the report's detour plot shows, per document
language, how much mass each layer puts on the other languages' keywords. It runs the job into
``OUT_DIR/run`` and writes the HTML report into ``OUT_DIR/run/report``. The job file is an
ordinary spec: ``codelens run OUT_DIR/job.yaml`` reruns (resumes) it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from codelens.engine.schemas import load_spec
from codelens.engine.zoo.code_sources import SOURCES, held_out_sample
from codelens.engine.zoo.default_model import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    held_out_by_language,
)
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


def demo_sample(files_per_language: int) -> dict[str, list[Path]]:
    """``files_per_language`` held-out files of each language, evenly spaced over its list."""
    return held_out_by_language(
        files_per_language, min_bytes=DEMO_MIN_FILE_BYTES, max_bytes=DEMO_MAX_FILE_BYTES
    )


def stdlib_sample(n_files: int) -> list[Path]:
    """``n_files`` held-out Python files (the benchmarks' single-language corpus)."""
    return held_out_sample(
        n_files, "python", min_bytes=DEMO_MIN_FILE_BYTES, max_bytes=DEMO_MAX_FILE_BYTES
    )


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


def demo_spec_data(out_dir: Path, files: dict[str, list[Path]]) -> dict[str, Any]:
    """The demo job spec as plain data (written to ``OUT_DIR/job.yaml``).

    ``files`` maps each language to its documents; every language gets a token set of its
    keywords (``exclusive``: words two languages share, like ``if``, are in neither set).
    """
    return {
        "schema_version": 1,
        "name": "demo",
        # "auto" is float32 on a CPU (the bf16 weights are upcast), the checkpoint's dtype on a GPU.
        "model": {"path": str(out_dir / "model"), "dtype": "auto", "device": "auto"},
        "corpus": {"kind": "files", "paths": [str(p) for paths in files.values() for p in paths]},
        "tokens": {"window": 256, "overlap": 32, "add_bos": True},
        "lens": {
            "layers": "all",
            "k": 5,
            "lookahead": [2, 3],
            "token_sets": {
                language: {
                    "keywords": SOURCES[language].lexer,
                    "exclusive": True,
                    "single_token": True,
                }
                for language in SOURCES
            },
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


def run_demo(out_dir: Path, *, n_files: int = 6) -> tuple[JobOutcome, dict[str, Any]]:
    """Copy the bundled model, write the job, run it, write the report.

    Returns:
        The outcome and ``summary.json``.
    """
    out_dir = Path(out_dir).resolve()
    install_model(out_dir / "model")
    job_file = out_dir / "job.yaml"
    spec_data = demo_spec_data(out_dir, demo_sample(n_files))
    job_file.write_text(yaml.safe_dump(spec_data, sort_keys=False))
    outcome = run_job(load_spec(job_file))
    run_dir = out_dir / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    index = write_demo_report(run_dir)
    if index is not None:
        print(f"report: {index}")
    return outcome, summary


def default_model_beside(run_dir: Path, out_dir: Path) -> Path:
    """Run the bundled model over the corpus of ``run_dir`` (``codelens compare --with-default``).

    The job copies the corpus and ``tokens`` sections of ``run_dir``'s job (so
    ``codelens compare`` finds the same documents; relative corpus paths are read from the
    current directory, as ``codelens run`` read them) and its look-ahead, ``k`` and token sets
    (string and language entries: ids mean other tokens in another vocabulary), at every layer;
    the model is the bundled one, copied to ``out_dir/default-model``.
    The run goes to ``out_dir/default-run`` and is resumed when it is already there.

    Returns:
        The run directory.

    Raises:
        RunDirError: ``run_dir`` has no ``job.json`` with a spec.
    """
    from codelens.engine.errors import RunDirError

    job_file = Path(run_dir) / "job.json"
    spec = json.loads(job_file.read_text()).get("spec") if job_file.exists() else None
    if not spec:
        raise RunDirError(
            f"{run_dir} has no job.json with a job spec: --with-default runs the bundled model "
            "over that run's corpus, so give a run directory written by codelens run"
        )
    out_dir = Path(out_dir).resolve()
    model_dir = install_model(out_dir / "default-model")
    theirs = spec.get("lens", {})
    lens = {key: theirs[key] for key in ("k", "lookahead", "entropy", "kl_final") if key in theirs}
    # Every layer (a list of layer numbers is the other model's depth), and only the token sets
    # that mean the same in any tokenizer: strings and language sets, not raw ids.
    lens["layers"] = "all"
    sets = {}
    for name, entries in (theirs.get("token_sets") or {}).items():
        if isinstance(entries, dict):
            sets[name] = entries
        else:
            words = [e for e in entries if isinstance(e, str)]
            if words:
                sets[name] = words
    lens["token_sets"] = sets
    data = {
        "schema_version": spec.get("schema_version", 1),
        "name": f"{DEFAULT_MODEL_NAME} beside {spec.get('name') or Path(run_dir).name}",
        "model": {"path": str(model_dir), "dtype": "auto", "device": "auto"},
        "corpus": spec["corpus"],
        "tokens": spec["tokens"],
        "lens": lens,
        "output": {"dir": str(out_dir / "default-run"), "shard_tokens": 8192},
        "execution": {"backend": "local", "batch_tokens": 4096},
    }
    job_yaml = out_dir / "default-job.yaml"
    job_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    run_job(load_spec(job_yaml))
    return out_dir / "default-run"
