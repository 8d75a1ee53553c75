"""Shared pytest fixtures.

Tiny models: ``tiny_model_dir(family, **overrides)`` builds a random model of ``family`` with its
tokenizer into a session temp directory (once per distinct arguments) and returns the directory;
``tiny_loaded_model(family, dtype=...)`` loads one through the real ``load_model`` path (once per
arguments). Both are shared by the whole session: treat what they return as read-only (copy a
directory before deleting files from it; never modify a loaded model's weights).

A test argument named ``tiny_family`` is parametrized over every tiny-model family.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from codelens.engine.loading import LoadedModel, load_model
from codelens.engine.tiny_models import TINY_FAMILIES, build_tiny_model


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test argument named ``tiny_family`` runs the test once per family in ``TINY_FAMILIES``.

    (Test modules cannot import names from this conftest under ``--import-mode=importlib``.)
    """
    if "tiny_family" in metafunc.fixturenames:
        metafunc.parametrize("tiny_family", TINY_FAMILIES)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_model_dir(family="llama", **build_kwargs) -> Path`` (cached per arguments).

    ``build_kwargs`` are those of ``build_tiny_model`` (``n_layers``, ``d_model``, ``seed``,
    ``vocab_size`` or HF config overrides such as ``tie_word_embeddings=False``).
    """
    built: dict[str, Path] = {}

    def build(family: str = "llama", **build_kwargs: Any) -> Path:
        key = f"{family}:{sorted(build_kwargs.items())!r}"
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            built[key] = build_tiny_model(out, family, **build_kwargs)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_loaded_model(tiny_model_dir: Callable[..., Path]) -> Callable[..., LoadedModel]:
    """Factory: ``tiny_loaded_model(family="llama", dtype="float32") -> LoadedModel`` on the CPU.

    Loaded (with the self-check) once per ``(family, dtype)`` for the session.
    """
    loaded: dict[tuple[str, str], LoadedModel] = {}

    def load(family: str = "llama", dtype: str = "float32") -> LoadedModel:
        if (family, dtype) not in loaded:
            loaded[family, dtype] = load_model(tiny_model_dir(family), dtype=dtype, device="cpu")
        return loaded[family, dtype]

    return load
