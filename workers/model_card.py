"""Write the bundled model's ``MODEL_CARD.md``: a lens job over the held-out files, then the card.

    python -m codelens.workers.model_card MODEL_DIR

The card quotes two things: the training figures (``training_log.json``, written by
``python -m codelens.engine.zoo.train_default``) and the lens figures of a real run of the lens
over every held-out file of every language (with one keyword token set per language). Running a
job is the workers' business, so this step
lives here and the engine's training script only formats the card
(:func:`codelens.engine.zoo.train_default.write_model_card`) from the summary it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from codelens.engine.schemas import validate_spec
from codelens.engine.zoo.code_sources import SOURCES
from codelens.engine.zoo.default_model import held_out_files
from codelens.engine.zoo.train_default import write_model_card
from codelens.workers.job import run_job


def held_out_job_data(model_dir: Path, files: list[Path], run_dir: Path) -> dict[str, Any]:
    """The held-out lens job whose summary.json the model card quotes."""
    return {
        "schema_version": 1,
        "name": "codelens-debian-code-held-out",
        "model": {"path": str(model_dir), "dtype": "auto", "device": "cpu"},
        "corpus": {"kind": "files", "paths": [str(p) for p in files]},
        "tokens": {"window": 256, "overlap": 32, "add_bos": True},
        "lens": {
            "layers": "all",
            "k": 5,
            "lookahead": [2],
            "kl_final": True,
            "entropy": True,
            "token_sets": {
                lang: {"keywords": source.lexer, "exclusive": True, "single_token": True}
                for lang, source in SOURCES.items()
            },
        },
        "output": {"dir": str(run_dir), "shard_tokens": 16384},
        "execution": {"backend": "local", "batch_tokens": 4096},
    }


def run_held_out_job(model_dir: Path, run_dir: Path, files: list[Path] | None = None) -> dict:
    """Run the held-out lens job into ``run_dir`` and return its summary.json.

    Args:
        model_dir: the trained model.
        run_dir: the job's output directory (replaced if it holds another job).
        files: the corpus (default: every held-out file of every language, as the card says).

    Returns:
        summary.json, plus ``_files``: the number of files, which the card quotes.
    """
    if files is None:
        # The languages the model was trained on (train_default --languages), in its log.
        log = json.loads((model_dir / "training_log.json").read_text())
        files = held_out_files(tuple(log["data"].get("languages", {})) or None)
    run_job(validate_spec(held_out_job_data(model_dir, files, run_dir)), overwrite=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["_files"] = len(files)
    return summary


def write_card(model_dir: Path, work: Path, files: list[Path] | None = None) -> Path:
    """Run the held-out job under ``work``, then write ``model_dir/MODEL_CARD.md`` (returned)."""
    return write_model_card(model_dir, run_held_out_job(model_dir, work / "run", files))


def publish(model_dir: Path, run_dir: Path, out_dir: Path) -> Path:
    """Write the held-out lens curves to ``out_dir/bundled-model-lens.md`` (+ its summary.json).

    The per-layer top-1, KL and entropy of the bundled model on its named held-out corpus, per
    document language, with the machine, versions and command that made them.
    """
    import platform

    import torch
    import transformers

    from codelens.engine.zoo.train_default import lens_curves_markdown, seed_findings_markdown

    summary = json.loads((run_dir / "summary.json").read_text())
    job = json.loads((run_dir / "job.json").read_text())
    log = json.loads((model_dir / "training_log.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bundled-model-held-out-summary.json").write_text(json.dumps(summary, indent=1))
    files = len(job["spec"]["corpus"]["paths"])
    languages = ", ".join(
        f"{lang} {d['held_out_files']} files" for lang, d in log["data"]["languages"].items()
    )
    text = f"""# Logit-lens curves of the bundled model on its held-out code

Per-layer top-1 accuracy, mean log-prob of the true next token, KL to the final layer, entropy and
median rank of `codelens-debian-code` (the bundled model, `engine/zoo/assets/`, see its
`MODEL_CARD.md`) over **every held-out file** of its languages on
{log["data"].get("os", "a Debian machine")} ({files} files: {languages}; the split rule is in
`engine/zoo/code_sources.py`, so the same files are held out on any Debian machine that has
them). Layer 0 is the embedding output, layer
{summary["n_blocks"]} the model's own output.

- Command: `python -m codelens.workers.model_card MODEL_DIR --keep RUN_DIR --publish
  benchmarks/results` (the card's lens job: windows of 256 with 32 of overlap, BOS, all layers,
  k 5, look-ahead 2, one keyword set per language of its one-token words, shared words removed;
  float32 on a CPU).
- Machine: {platform.machine()} CPU, {os.cpu_count()} cores; Python {platform.python_version()},
  torch {torch.__version__}, transformers {transformers.__version__}.
- Run: {summary["tokens"]:,} positions; the full `summary.json` is
  `bundled-model-held-out-summary.json` beside this file.

To put another model beside these curves, run it over the same files (the job above with another
`model.path`) and `codelens compare` the two runs; or `codelens compare YOUR_RUN --with-default`
on any corpus.

{lens_curves_markdown(summary)}

## The seeds' findings on this model

{seed_findings_markdown(summary)}
"""
    path = out_dir / "bundled-model-lens.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a model written by train_default --out")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the held-out lens run here (e.g. to publish its summary.json)",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="also write the curves to PUBLISH/bundled-model-lens.md (needs --keep)",
    )
    args = parser.parse_args(argv)
    if args.publish is not None and args.keep is None:
        parser.error("--publish needs --keep RUN_DIR (the run it publishes)")
    if args.keep is not None:
        print(write_card(args.model_dir, args.keep))
        if args.publish is not None:
            print(publish(args.model_dir, args.keep / "run", args.publish))
        return
    # The lens run goes to a temporary directory, never next to the packaged model.
    with tempfile.TemporaryDirectory(prefix="codelens-card-") as tmp:
        print(write_card(args.model_dir, Path(tmp)))


if __name__ == "__main__":
    main()
