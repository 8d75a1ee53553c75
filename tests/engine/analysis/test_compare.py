"""``codelens compare``: several runs on a relative-depth axis, refusal of different corpora, and
the page opened in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codelens.engine.schemas import validate_spec
from codelens.workers.cli import app
from codelens.workers.job import run_job

CODE = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"


def _run(model: Path, corpus: Path, out: Path, name: str) -> Path:
    spec = validate_spec(
        {
            "name": name,
            "model": {"path": str(model), "device": "cpu"},
            "corpus": {"kind": "files", "paths": [str(corpus / "*.py")]},
            "lens": {"k": 1, "lookahead": [], "token_sets": {}},
            "output": {"dir": str(out)},
        }
    )
    run_job(spec, show_progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    same, other = root / "corpus", root / "other"
    same.mkdir()
    other.mkdir()
    (same / "a.py").write_text(CODE)
    (other / "b.py").write_text(CODE.replace("add", "mul"))
    return (
        _run(tiny_model_dir("llama"), same, root / "llama", "llama2"),
        _run(tiny_model_dir("qwen2", n_layers=3), same, root / "qwen", "qwen3l"),
        _run(tiny_model_dir("llama"), other, root / "other", "other"),
        root,
    )


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_compare_writes_a_page_on_relative_depth(runs):
    a, b, _, root = runs
    result = invoke("compare", a, b, "--out", root / "cmp")
    assert result.exit_code == 0, result.output
    page = (root / "cmp" / "index.html").read_text()
    assert (root / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "llama2 (llama, L=2)" in page and "qwen3l (qwen2, L=3)" in page
    # Every layer of both runs is in the table, at layer / L.
    for run_dir, n in ((a, 2), (b, 3)):
        summary = json.loads((run_dir / "summary.json").read_text())
        for entry in summary["layers"]:
            assert f"<td>{entry['layer'] / n:.2f}</td>" in page
            assert f"{entry['top1_accuracy']:.3f}" in page
    assert "Warning" not in page


def test_compare_refuses_different_corpora_unless_allowed(runs):
    a, _, c, root = runs
    result = invoke("compare", a, c, "--out", root / "bad")
    assert result.exit_code == 2 and "different corpora" in result.output
    assert "--allow-different-corpora" in result.output
    assert not (root / "bad" / "index.html").exists()
    result = invoke("compare", a, c, "--out", root / "bad", "--allow-different-corpora")
    assert result.exit_code == 0, result.output
    assert "Warning: the runs read different corpora" in (root / "bad" / "index.html").read_text()


def test_compare_needs_two_finished_runs(runs, tmp_path):
    a, _, _, _ = runs
    result = invoke("compare", a, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "at least two" in result.output
    result = invoke("compare", a, tmp_path, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "summary.json" in result.output


def test_compare_renders_in_headless_chromium(runs, tmp_path):
    binary = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if binary is None:
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    a, b, _, root = runs
    assert invoke("compare", a, b, "--out", root / "shown").exit_code == 0
    index = (root / "shown" / "index.html").resolve()
    probe = tmp_path / "probe.html"
    probe.write_text(
        f'<!DOCTYPE html><html><body><iframe id="f" src="{index.as_uri()}" width="1400" '
        'height="2000"></iframe><pre id="out">pending</pre><script>'
        "document.getElementById('f').addEventListener('load', () => {"
        "const d = document.getElementById('f').contentDocument;"
        "document.getElementById('out').textContent = JSON.stringify({"
        "imgs: [...d.images].map(i => [i.naturalWidth, i.naturalHeight]),"
        "tables: [...d.querySelectorAll('table')].map(t => t.rows.length),"
        "h2: [...d.querySelectorAll('h2')].map(h => h.textContent)});});"
        "</script></body></html>"
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    done = subprocess.run(
        [
            binary,
            *flags,
            "--allow-file-access-from-files",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(
        done.stdout.split('<pre id="out">', 1)[1].split("</pre>", 1)[0].replace("&amp;", "&")
    )
    assert len(seen["imgs"]) == 1
    width, height = seen["imgs"][0]
    assert width > 500 and height > 300, "the figure did not load or decode in the browser"
    assert seen["tables"] == [1 + 3 + 4], "a header row plus one row per layer of each run"
    assert seen["h2"] == ["Per-layer curves", "Numbers per layer"]
