"""The bundled default model ``codelens-debian-code``: where it ships and what it was trained on.

The model (an 8-layer Llama-style code LM with a 4096-token byte-level BPE, trained from scratch
by :mod:`codelens.engine.zoo.train_default`) ships as package data in
``engine/zoo/assets/codelens-debian-code``; ``codelens demo`` runs the lens over it, and
``MODEL_CARD.md`` there documents its size, data and held-out figures.

Data: code in four languages that every Debian machine has (Python's standard library, C
headers, Perl modules, shell scripts), split into train / held-out files by a hash of each file's
path: :mod:`codelens.engine.zoo.code_sources` says where each language comes from, its licence,
the split rule and the byte caps.
"""

from __future__ import annotations

from pathlib import Path

from codelens.engine.zoo.code_sources import SOURCES, held_out_sample, split

DEFAULT_MODEL_NAME = "codelens-debian-code"
"""Directory name of the bundled model under ``engine/zoo/assets``."""

__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_model_dir",
    "held_out_files",
    "held_out_by_language",
]


def default_model_dir() -> Path:
    """The bundled model directory (``config.json``, ``model.safetensors``, tokenizer, card).

    Works from a source checkout and from an installed wheel (the assets are package data).
    """
    return Path(__file__).resolve().parent / "assets" / DEFAULT_MODEL_NAME


def held_out_files(languages: tuple[str, ...] | None = None) -> list[Path]:
    """Every held-out file of the model's languages present on this machine, language by
    language (``code_sources.SOURCES`` order), each language's files sorted."""
    return [f.path for lang in languages or tuple(SOURCES) for f in split(lang)[1]]


def held_out_by_language(n_files: int, **size: int) -> dict[str, list[Path]]:
    """``n_files`` held-out files of each language this machine has (``held_out_sample``);
    languages with no held-out file here are left out."""
    out = {}
    for language in SOURCES:
        try:
            out[language] = held_out_sample(n_files, language, **size)
        except FileNotFoundError:
            continue
    return out
