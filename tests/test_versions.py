"""Version gates: a dependency outside the tested range gets an error naming the installed and the
supported versions and the fix (or, for ``impl: auto``, a warning and the torch path)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from codelens.engine.errors import CodelensError, ModelLoadError
from codelens.engine.model.loading import load_model
from codelens.engine.model.placement import ACCELERATE_SUPPORTED, require_accelerate
from codelens.kernels import LensImpl, resolve_impl
from codelens.kernels.dispatch import TRITON_SUPPORTED, triton_unavailable_reason
from codelens.workers.cli import app


@pytest.fixture
def installed(monkeypatch):
    """``installed(triton="3.5.0", numpy=...)``: what importlib.metadata reports for those names
    (triton is also made findable, so the gate is reached without triton installed)."""

    def fake(**versions: str) -> None:
        real_version, real_find_spec = importlib.metadata.version, importlib.util.find_spec
        monkeypatch.setattr(
            importlib.metadata,
            "version",
            lambda name: versions.get(name) or real_version(name),
        )
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: object() if name == "triton" else real_find_spec(name, *a),
        )

    return fake


@pytest.mark.parametrize("version", ["3.5.0", "3.10.0", "4.0.0"])
def test_triton_outside_the_tested_range_is_refused_by_name(installed, version):
    installed(triton=version)
    with pytest.raises(RuntimeError) as info:
        resolve_impl("triton", "cuda")
    message = str(info.value)
    assert f"triton {version} is installed" in message
    assert f"triton{TRITON_SUPPORTED}" in message and "impl 'torch'" in message


@pytest.mark.parametrize("version", ["3.6.0", "3.9.0", "3.8.0+git1234"])
def test_triton_inside_the_tested_range_runs_on_cuda(installed, version):
    installed(triton=version)
    assert triton_unavailable_reason(torch.device("cuda")) is None
    chosen = resolve_impl("auto", "cuda", d_model=4096, k=10)
    assert chosen.is_triton and chosen is not LensImpl.TRITON  # a concrete strategy
    assert resolve_impl("triton", "cuda", d_model=4096, k=10) is chosen


def test_auto_falls_back_to_torch_with_a_warning(installed):
    installed(triton="3.5.0")
    with pytest.warns(RuntimeWarning, match=r"runs the torch lens on cuda.*triton 3\.5\.0"):
        assert resolve_impl("auto", "cuda") is LensImpl.TORCH
    # On a CPU auto means torch anyway: no warning to act on.
    assert resolve_impl("auto", "cpu") is LensImpl.TORCH


def test_triton_36_interpreter_needs_numpy_below_24(installed, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    installed(triton="3.6.0", numpy="2.4.1")
    reason = triton_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "numpy 2.4.1" in reason and "numpy<2.4" in reason
    installed(triton="3.6.0", numpy="2.3.5")
    assert triton_unavailable_reason(torch.device("cpu")) is None


@pytest.fixture
def write_job(tiny_model_dir, tmp_path, write_corpus, job_file):
    """``write_job(**lens)``: a one-file job over the tiny llama writing to ``tmp_path/run``;
    returns the spec's path."""

    def write(**lens) -> str:
        src = write_corpus(tmp_path / "src", {"a.py": "def f(x):\n    return x\n"})
        model = tiny_model_dir("llama")
        return str(job_file(tmp_path / "job.yaml", model, src, tmp_path / "run", lens=lens))

    return write


def test_run_with_an_unsupported_triton_fails_before_any_shard(installed, write_job, tmp_path):
    job = write_job(impl="triton")
    installed(triton="3.5.0")
    result = CliRunner().invoke(app, ["run", job])
    assert result.exit_code == 2, result.output
    assert "triton 3.5.0 is installed" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "run").glob("lens/*.parquet"))


def test_old_transformers_is_refused_by_name(monkeypatch, tiny_model_dir):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.46.1")
    with pytest.raises(ModelLoadError, match=r"transformers 4\.46\.1 is installed.*>=5\.0"):
        load_model(tiny_model_dir("llama"), device="cpu")


def test_old_ray_is_refused_by_name(monkeypatch):
    ray = pytest.importorskip("ray")
    from codelens.workers import ray_backend

    monkeypatch.setattr(ray, "__version__", "2.9.0")
    with pytest.raises(CodelensError, match=r"ray 2\.9\.0 is installed.*ray>=2\.40"):
        ray_backend._require_ray()


def test_job_json_records_the_versions(write_job, tmp_path):
    """The versions a run used are in job.json, so its numbers can be traced to a lock."""
    result = CliRunner().invoke(app, ["run", write_job()])
    assert result.exit_code == 0, result.output
    versions = json.loads((tmp_path / "run" / "job.json").read_text())["versions"]
    for name in ("torch", "transformers", "pyarrow"):
        assert versions[name] == importlib.metadata.version(name)


@pytest.mark.parametrize("version", ["0.34.2", "1.0.1"])
def test_accelerate_below_the_floor_is_refused_by_name(installed, version):
    installed(accelerate=version)
    with pytest.raises(ModelLoadError) as info:
        require_accelerate()
    message = str(info.value)
    assert f"accelerate {version} is installed" in message
    assert f"pip install 'accelerate{ACCELERATE_SUPPORTED}'" in message
