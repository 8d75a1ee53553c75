"""Shared pytest fixtures.

Tiny models: ``tiny_model_dir(family, **overrides)`` builds a random model of ``family`` with its
tokenizer into a session temp directory (once per distinct arguments) and returns the directory;
``tiny_loaded_model(family, dtype=...)`` loads one through the real ``load_model`` path (once per
arguments). Both are shared by the whole session: treat what they return as read-only (copy a
directory before deleting files from it; never modify a loaded model's weights).

A test argument named ``tiny_family`` is parametrized over every tiny-model family.

``ray_cluster`` starts one local Ray instance for the session (Ray tests only; skipped without Ray).

``assert_same_rows(a, b)``: two lens tables hold the same rows (any row order, NaN equal to NaN).
"""

from __future__ import annotations

import os
import shutil

# Triton picks interpreter or compiler when a function is decorated, i.e. when triton is first
# imported (transformers can pull it in through torch._dynamo). Without an NVIDIA GPU the kernel
# tests run in Triton's CPU interpreter, so the switch is set here, before any import of triton.
# (auto dispatch still picks the torch path on a CPU: the interpreter is for tests only.)
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402

from codelens.engine.model.loading import LoadedModel, load_model  # noqa: E402
from codelens.engine.zoo.tiny_models import TINY_FAMILIES, build_tiny_model  # noqa: E402


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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray instance for the whole session (2 CPUs, no GPU); yields its GCS address.

    Starting Ray costs several seconds, so every Ray test shares this instance: a ``RayExecutor``
    finds Ray initialised in the process and attaches to it instead of starting its own, and a
    ``codelens run`` subprocess joins it through ``execution.ray_address``. Token authentication is
    switched off (``RAY_AUTH_MODE=disabled``, inherited by subprocess drivers) so that the tests
    write no token into ``~/.ray``; the temp dir (``RAY_TMPDIR``) is short because Ray's Unix socket
    paths must fit in ~107 bytes. Skipped when Ray is not installed.
    """
    ray = pytest.importorskip("ray")
    names = ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_TMPDIR")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir  # Ray's documented knob (ray.init's _temp_dir is private)
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=150 * 2**20,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    key = [("layer", "ascending"), ("doc", "ascending"), ("pos", "ascending")]
    a, b = a.sort_by(key), b.sort_by(key)
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        x = a.column(name).to_numpy(zero_copy_only=False)
        y = b.column(name).to_numpy(zero_copy_only=False)
        if x.dtype == object:
            x, y = np.stack(x), np.stack(y)
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture(scope="session")
def assert_same_rows() -> Callable[[pa.Table, pa.Table], None]:
    """``assert_same_rows(a, b)``: equal schemas and rows, column by column, in (layer, doc, pos)
    order, NaN equal to NaN (pyarrow's ``equals`` says NaN != NaN)."""
    return _assert_same_rows
