"""Write the bundled model's ``MODEL_CARD.md``: a lens job over the held-out files, then the card.

    python -m codelens.workers.model_card MODEL_DIR

The card quotes two things: the training figures (``training_log.json``, written by
``python -m codelens.engine.zoo.train_default``) and the lens figures of a real run of the lens
over every held-out standard-library file. Running a job is the workers' business, so this step
lives here and the engine's training script only formats the card
(:func:`codelens.engine.zoo.train_default.write_model_card`) from the summary it is given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from codelens.engine.schemas import validate_spec
from codelens.engine.zoo.default_model import held_out_files
from codelens.engine.zoo.train_default import write_model_card
from codelens.workers.job import run_job


def held_out_job_data(model_dir: Path, files: list[Path], run_dir: Path) -> dict[str, Any]:
    """The held-out lens job whose summary.json the model card quotes."""
    return {
        "schema_version": 1,
        "name": "codelens-stdlib-py-held-out",
        "model": {"path": str(model_dir), "dtype": "auto", "device": "cpu"},
        "corpus": {"kind": "files", "paths": [str(p) for p in files]},
        "tokens": {"window": 256, "overlap": 32, "add_bos": True},
        "lens": {"layers": "all", "k": 5, "lookahead": [], "kl_final": True, "entropy": True},
        "output": {"dir": str(run_dir), "shard_tokens": 16384},
        "execution": {"backend": "local", "batch_tokens": 4096},
    }


def run_held_out_job(model_dir: Path, run_dir: Path, files: list[Path] | None = None) -> dict:
    """Run the held-out lens job into ``run_dir`` and return its summary.json.

    Args:
        model_dir: the trained model.
        run_dir: the job's output directory (replaced if it holds another job).
        files: the corpus (default: every held-out standard-library file, as the card says).

    Returns:
        summary.json, plus ``_files``: the number of files, which the card quotes.
    """
    files = held_out_files() if files is None else files
    run_job(validate_spec(held_out_job_data(model_dir, files, run_dir)), overwrite=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["_files"] = len(files)
    return summary


def write_card(model_dir: Path, work: Path, files: list[Path] | None = None) -> Path:
    """Run the held-out job under ``work``, then write ``model_dir/MODEL_CARD.md`` (returned)."""
    return write_model_card(model_dir, run_held_out_job(model_dir, work / "run", files))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a model written by train_default --out")
    args = parser.parse_args(argv)
    # The lens run goes to a temporary directory, never next to the packaged model.
    with tempfile.TemporaryDirectory(prefix="codelens-card-") as tmp:
        print(write_card(args.model_dir, Path(tmp)))


if __name__ == "__main__":
    main()
