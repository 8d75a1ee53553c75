"""The ``codelens`` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codelens.workers.cli import app

runner = CliRunner()


@pytest.fixture
def job(tiny_model_dir, tmp_path: Path, write_corpus, job_file) -> Path:
    """``tmp_path/job.yaml``: the tiny llama (device left to ``auto``) over one file in
    ``tmp_path/src``, writing ``tmp_path/run``."""
    corpus = write_corpus(
        tmp_path / "src", {"m.py": "def f(x):\n    return x + 1\n\nprint(f(2))\n"}
    )
    return job_file(
        tmp_path / "job.yaml",
        tiny_model_dir("llama"),
        corpus,
        tmp_path / "run",
        device=None,
        tokens={"window": 64, "overlap": 8},
        lens={"k": 3},
        execution={"batch_tokens": 128},
    )


def test_console_script_runs_a_job_and_reports_status(job, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        ["codelens", "run", str(job)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "done:" in done.stderr and "lens impl torch" in done.stderr
    assert "Loading weights" not in done.stderr, "transformers' own bars are silenced"
    status = subprocess.run(
        ["codelens", "status", str(tmp_path / "run")], capture_output=True, text=True, env=env
    )
    assert status.returncode == 0 and "done" in status.stdout and "100.0%" in status.stdout
    again = subprocess.run(["codelens", "run", str(job)], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_set_overrides_and_overwrite(job, tmp_path):
    assert runner.invoke(app, ["run", str(job)]).exit_code == 0
    refused = runner.invoke(app, ["run", str(job), "--set", "lens.k=2"])
    assert (
        refused.exit_code == 2
        and "different job" in refused.output
        and "--overwrite" in refused.output
    )
    ok = runner.invoke(app, ["run", str(job), "--set", "lens.k=2", "--overwrite"])
    assert ok.exit_code == 0, ok.output
    saved = json.loads((tmp_path / "run" / "job.json").read_text())
    assert saved["spec"]["lens"]["k"] == 2


@pytest.mark.parametrize(
    "setting,message",
    [
        (["--set", "model.path=/no/such/model"], "does not exist"),
        (["--set", "corpus.paths=[/no/such/dir/*.py]"], "matches no file"),
        (["--set", "lens.layers=[0, 99]"], "index 99 is out of range"),
        (["--set", "lens.k=1000"], "larger than the vocabulary"),
        (["--set", "lens.kk=3"], "lens.kk: unknown key"),
        (["--set", "model.dtype=int4"], "model.dtype"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(job, setting, message):
    result = runner.invoke(app, ["run", str(job), *setting])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_status_of_a_missing_run(tmp_path):
    result = runner.invoke(app, ["status", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no run directory" in result.output


def test_schema_prints_the_json_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "JobSpec" and "lens" in schema["properties"]


@pytest.mark.slow
def test_demo_runs_the_main_job(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from codelens.workers.cli import main; main()",
            "demo",
            str(tmp_path / "demo"),
            "--files",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "per-layer lens" in result.stdout
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "demo" / "model" / "config.json").read_text())
    assert summary["tokens"] > 1000
    assert len(summary["layers"]) == config["num_hidden_layers"] + 1
    # Every language this machine has, each with its own keyword set for the detour plot.
    languages = set(summary["layers"][-1]["by_language"])
    assert "python" in languages and languages <= {"python", "c", "perl", "shell"}
    assert set(summary["layers"][-1]["token_set_mean_mass"]) == {"python", "c", "perl", "shell"}
    assert (tmp_path / "demo" / "run" / "report" / "token_sets.png").exists()
    assert (tmp_path / "demo" / "job.yaml").exists() and (
        tmp_path / "demo" / "model" / "model.safetensors"
    ).exists()


def test_bench_reports_lens_forward_and_bound(tiny_model_dir):
    result = runner.invoke(
        app, ["bench", "--model", str(tiny_model_dir("gpt2")), "--tokens", "96", "--seq-len", "48"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for piece in (
        "forward (capture)",
        "lens (all statistics)",
        "matmul bound",
        "[rows, d] x [d, V]",
        "lens / forward =",
    ):
        assert piece in text


def test_bench_bad_model_dir(tmp_path):
    result = runner.invoke(app, ["bench", "--model", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.output
