"""Shared pytest fixtures.

Tiny models: ``tiny_model_dir(family, **overrides)`` builds a random model of ``family`` with its
tokenizer into a session temp directory (once per distinct arguments) and returns the directory;
``tiny_loaded_model(family, dtype=...)`` loads one through the real ``load_model`` path (once per
arguments). Both are shared by the whole session: treat what they return as read-only (copy a
directory before deleting files from it; never modify a loaded model's weights).

A test argument named ``tiny_family`` is parametrized over every tiny-model family.

``ray_cluster`` starts one local Ray instance for the session (Ray tests only; skipped without Ray).

``assert_same_rows(a, b, atol=None)``: two lens tables hold the same rows (any row order, NaN equal
to NaN); with ``atol``, float columns agree within it instead of bit for bit.

Jobs and run directories (each a factory, shared by the engine, kernel and workers tests):

- ``write_corpus(root, {"a.py": "...", "sub/b.bin": b"..."})``: writes the files (str as UTF-8,
  bytes as they are, parent folders made) under ``root`` and returns ``root``.
- ``job_spec(model_dir, corpus, out, base=None, *, glob="*.py", device="cpu", **sections)``: the
  validated ``JobSpec`` of a job over the files ``corpus / glob`` with the model at ``model_dir``
  on ``device`` (``None``: left out, i.e. ``auto``), writing to ``out``.
  ``base`` and then ``sections`` (``name=``, ``model=``, ``tokens=``, ``lens=``, ``output=``,
  ``execution=``, ...) are laid over that: a dict is merged into the section it names, key by key,
  anything else replaces it. A test module keeps its own settings in a ``base`` dict and passes
  only what a test changes: ``job_spec(model, corpus, out, JOB, lens={"k": 3})``.
- ``job_file(path, model_dir, corpus, out, base=None, **same)``: the same job, as the user writes
  it (the unvalidated sections, not every default), saved as YAML at ``path``; returns ``path``.
- ``read_rows(run_dir, stack=())``: a run's ``lens/`` part files as ``{column: numpy array}``
  (list columns as arrays of arrays, or stacked into 2-D arrays for the names in ``stack``;
  dictionary columns such as ``category`` as object arrays of str, a null as None).
- ``read_status(run_dir)``: ``_status.json`` as a dict.
- ``read_manifest(run_dir, running=False)``: the entries (dicts) of ``_manifest.jsonl`` in file
  order. ``running=True`` reads a job that may still be writing: no manifest yet is ``[]`` and a
  torn line is passed over (without it, either is an error).

``dead_pid``: the pid of a process of this host that has exited (a killed driver's, for locks).
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

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterable, Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from codelens.engine.model.loading import LoadedModel, load_model  # noqa: E402
from codelens.engine.schemas import JobSpec, validate_spec  # noqa: E402
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


def _assert_same_rows(a: pa.Table, b: pa.Table, atol: float | None = None) -> None:
    key = [("layer", "ascending"), ("doc", "ascending"), ("pos", "ascending")]
    a, b = a.sort_by(key), b.sort_by(key)
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        x = a.column(name).to_numpy(zero_copy_only=False)
        y = b.column(name).to_numpy(zero_copy_only=False)
        if x.dtype == object:
            x, y = np.stack(x), np.stack(y)
        if atol is not None and x.dtype.kind == "f":
            assert np.array_equal(np.isnan(x), np.isnan(y)), name
            assert np.nanmax(np.abs(x - y)) < atol, name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture(scope="session")
def assert_same_rows() -> Callable[..., None]:
    """``assert_same_rows(a, b, atol=None)``: equal schemas and rows, column by column, in (layer,
    doc, pos) order, NaN equal to NaN (pyarrow's ``equals`` says NaN != NaN). With ``atol``, float
    columns need NaN in the same places and ``max |a - b| < atol`` elsewhere (two computations of
    the same statistics); the other columns are still compared exactly."""
    return _assert_same_rows


# --- jobs and run directories ---------------------------------------------------------------------


def _write_corpus(root: Path, files: Mapping[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def write_corpus() -> Callable[[Path, Mapping[str, str | bytes]], Path]:
    """``write_corpus(root, files) -> root``: each ``name: text`` of ``files`` written under
    ``root`` (str as UTF-8, bytes as they are; ``root`` and sub-folders of names are made)."""
    return _write_corpus


def _job_data(
    model_dir: Path | str,
    corpus: Path,
    out: Path | str,
    base: Mapping[str, Any] | None = None,
    *,
    glob: str = "*.py",
    device: str | None = "cpu",
    **sections: Any,
) -> dict[str, Any]:
    model: dict[str, Any] = {"path": str(model_dir)}
    if device is not None:
        model["device"] = device
    data: dict[str, Any] = {
        "model": model,
        "corpus": {"kind": "files", "paths": [str(corpus / glob)]},
        "output": {"dir": str(out)},
    }
    for layer in (base or {}, sections):
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
                data[key] = {**data[key], **value}
            else:
                data[key] = dict(value) if isinstance(value, Mapping) else value
    return data


@pytest.fixture(scope="session")
def job_spec() -> Callable[..., JobSpec]:
    """``job_spec(model_dir, corpus, out, base=None, *, glob="*.py", device="cpu", **sections)``:
    the validated spec of a files job (see this module's docstring for how sections combine)."""

    def make(*args: Any, **kwargs: Any) -> JobSpec:
        return validate_spec(_job_data(*args, **kwargs))

    return make


@pytest.fixture(scope="session")
def job_file() -> Callable[..., Path]:
    """``job_file(path, model_dir, corpus, out, base=None, **same as job_spec) -> path``: the job
    written as YAML, only the sections given (what a user writes; the CLI validates it)."""

    def write(path: Path, *args: Any, **kwargs: Any) -> Path:
        path.write_text(yaml.safe_dump(_job_data(*args, **kwargs)))
        return path

    return write


def _read_rows(run_dir: Path, stack: Iterable[str] = ()) -> dict[str, np.ndarray]:
    table = pq.read_table(run_dir / "lens")
    stack = set(stack)
    rows = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_dictionary(column.type):  # to_numpy would fill a null with a category
            rows[name] = np.array(column.to_pylist(), dtype=object)
        elif name in stack:
            rows[name] = np.stack(column.to_numpy(zero_copy_only=False))
        else:
            rows[name] = column.to_numpy(zero_copy_only=False)
    return rows


@pytest.fixture(scope="session")
def read_rows() -> Callable[..., dict[str, np.ndarray]]:
    """``read_rows(run_dir, stack=())``: the rows of ``run_dir/lens`` as ``{column: array}``, in
    file order. A list column is an object array of arrays, or a 2-D array if named in ``stack``;
    a dictionary column (``category``) is an object array of str (None for a null)."""
    return _read_rows


@pytest.fixture(scope="session")
def read_status() -> Callable[[Path], dict[str, Any]]:
    """``read_status(run_dir)``: the run's ``_status.json``."""

    def read(run_dir: Path) -> dict[str, Any]:
        return json.loads((run_dir / "_status.json").read_text())

    return read


@pytest.fixture(scope="session")
def read_manifest() -> Callable[..., list[dict[str, Any]]]:
    """``read_manifest(run_dir, running=False)``: the entries of ``_manifest.jsonl``, in order.

    ``running=True`` is for a job still being written: a missing manifest reads as ``[]`` and a
    line that is not JSON (torn, being appended) is passed over. Otherwise both raise.
    """

    def read(run_dir: Path, running: bool = False) -> list[dict[str, Any]]:
        path = run_dir / "_manifest.jsonl"
        if running and not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if not running:
                    raise
        return entries

    return read


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process (a Python child of this one) that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)
