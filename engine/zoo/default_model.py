"""The bundled default model ``codelens-stdlib-py`` and its train / held-out file split.

The model (a 4-layer Llama-style code LM with a 4096-token byte-level BPE, trained from scratch by
:mod:`codelens.engine.zoo.train_default`) ships as package data in
``engine/zoo/assets/codelens-stdlib-py``; ``codelens demo`` runs the lens over it, and
``MODEL_CARD.md`` there documents its size, data and held-out figures.

Data: every ``*.py`` file under the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), except

- ``site-packages/`` (third-party code installed into the interpreter, not the standard library);
- test code: any file under a directory named ``test``, ``tests`` or ``idle_test``, and any file
  named ``test_*.py`` (the test suite is ~60% of the bytes and very repetitive).

Split: a file is *held out* when ``sha256(relative POSIX path)`` read as an integer is 0 modulo
``HELD_OUT_MODULUS`` (20, i.e. ~5% of the files). The rule depends only on the path, so it is the
same on every Python version and machine: a held-out file of 3.11 is held out on 3.12 too (new
files fall on either side). Held-out files are never trained on (neither the model nor the
tokenizer); they are the evaluation set and the demo corpus.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

DEFAULT_MODEL_NAME = "codelens-stdlib-py"
"""Directory name of the bundled model under ``engine/zoo/assets``."""

HELD_OUT_MODULUS = 20
"""A file is held out when ``int(sha256(rel_path)) % HELD_OUT_MODULUS == 0`` (~5%)."""

EXCLUDED_DIR_NAMES = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
"""Directories (at any depth under the stdlib root) whose files are neither trained on nor held
out."""


def default_model_dir() -> Path:
    """The bundled model directory (``config.json``, ``model.safetensors``, tokenizer, card).

    Works from a source checkout and from an installed wheel (the assets are package data).
    """
    return Path(__file__).resolve().parent / "assets" / DEFAULT_MODEL_NAME


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_excluded(rel_path: str | Path) -> bool:
    """True for paths outside the data set: ``site-packages``, test directories, ``test_*.py``."""
    parts = Path(rel_path).parts
    return bool(EXCLUDED_DIR_NAMES.intersection(parts[:-1])) or parts[-1].startswith("test_")


def is_held_out(rel_path: str | Path) -> bool:
    """The split rule: held out iff sha256(relative POSIX path) is 0 mod ``HELD_OUT_MODULUS``."""
    digest = hashlib.sha256(Path(rel_path).as_posix().encode("utf-8")).hexdigest()
    return int(digest, 16) % HELD_OUT_MODULUS == 0


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of every data-set file under ``root`` (the stdlib), sorted."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if p.is_file() and not is_excluded(rel):
            out.append(rel.as_posix())
    return sorted(out)


def split_files(root: Path | None = None) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` relative paths under ``root`` (the stdlib), each sorted."""
    files = stdlib_files(root)
    held = [f for f in files if is_held_out(f)]
    train = [f for f in files if not is_held_out(f)]
    return train, held


def held_out_files(
    root: Path | None = None, *, min_bytes: int = 0, max_bytes: int | None = None
) -> list[Path]:
    """Absolute paths of the held-out files of the running stdlib, sorted, optionally by size."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for rel in split_files(root)[1]:
        path = root / rel
        size = path.stat().st_size
        if size >= min_bytes and (max_bytes is None or size <= max_bytes):
            out.append(path)
    return out


def held_out_sample(n_files: int, *, min_bytes: int = 2_000, max_bytes: int = 40_000) -> list[Path]:
    """``n_files`` held-out files evenly spaced over the sorted list (deterministic).

    Raises:
        FileNotFoundError: the interpreter ships no (held-out) standard-library sources.
    """
    candidates = held_out_files(min_bytes=min_bytes, max_bytes=max_bytes)
    if not candidates:
        raise FileNotFoundError(f"no held-out standard-library sources found under {stdlib_root()}")
    n = max(1, min(n_files, len(candidates)))
    step = len(candidates) / n
    return [candidates[int(i * step)] for i in range(n)]
