"""``codelens report`` and ``codelens plot`` from the CLI on a real run, the report opened in
headless Chromium as a user would, and the plot grid's cells checked against a run's rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from codelens.engine.schemas import validate_spec
from codelens.workers.cli import app
from codelens.workers.job import run_job

CODE = (
    "import os\n\n"
    "def walk(root, depth=0):\n"
    "    # yield every python file below root\n"
    "    for name in sorted(os.listdir(root)):\n"
    "        path = os.path.join(root, name)\n"
    "        if name.endswith('.py') and depth < 3:\n"
    "            yield path\n"
    "    return None\n"
)
JS = "function add(a, b) {\n  return a + b; // sum\n}\nconsole.log(add(1, 2));\n"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A finished run over two Python files and a JavaScript file; returns (run dir, model dir)."""
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "walk.py").write_text(CODE)
    (corpus / "more.py").write_text(CODE.replace("walk", "scan") * 2)
    (corpus / "add.js").write_text(JS)
    model = tiny_model_dir("llama")
    spec = validate_spec(
        {
            "name": "report-test",
            "model": {"path": str(model), "device": "cpu"},
            "corpus": {"kind": "files", "paths": [str(corpus / "*")]},
            "tokens": {"window": 512, "overlap": 16},
            "lens": {
                "k": 3,
                "lookahead": [2],
                "token_sets": {"py": ["def", "self"], "js": ["function"]},
            },
            "output": {"dir": str(root / "run"), "shard_tokens": 200},
        }
    )
    run_job(spec, show_progress=False)
    return root / "run", model, corpus


@pytest.fixture(scope="module")
def report_index(run) -> Path:
    """The report of the run, built once from the CLI for the tests that read it."""
    run_dir, _, _ = run
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("index.html")
    return run_dir / "report" / "index.html"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


class _Collector(HTMLParser):
    """Images, section ids, table rows, and the plot grid's cells of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.sections: list[str] = []
        self.rows = 0
        self.cells: list[dict[str, str]] = []
        self._cell: dict[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "section":
            self.sections.append(a["id"])
        elif tag == "tr":
            self.rows += 1
        elif tag == "td" and "cell" in (a.get("class") or "").split():
            self._cell = {**a, "text": ""}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None


def parse(path: Path) -> _Collector:
    c = _Collector()
    c.feed(path.read_text())
    return c


def test_report_from_the_cli(run, report_index):
    run_dir, _, _ = run
    index = report_index
    page = parse(index)
    assert page.sections == [
        "layers",
        "categories",
        "languages",
        "positions",
        "ranks",
        "convergence",
        "token_sets",
        "lookahead",
        "table",
    ]
    assert page.images == [f"{s}.png" for s in page.sections if s != "table"]
    for name in page.images:
        assert (run_dir / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((run_dir / "summary.json").read_text())
    text = index.read_text()
    for entry in summary["layers"]:  # the numbers table shows every layer's top-1 accuracy
        assert f"{entry['top1_accuracy']:.3f}" in text
    assert "Convergence layer" in text and "javascript" in text


def test_report_of_a_lean_run_leaves_out_what_was_not_computed(tiny_model_dir, run, tmp_path):
    """Selected layers, no look-ahead, token sets, entropy or KL: the page says what there is."""
    _, _, corpus = run
    spec = validate_spec(
        {
            "model": {"path": str(tiny_model_dir("llama")), "device": "cpu"},
            "corpus": {"kind": "files", "paths": [str(corpus / "*.py")]},
            "lens": {
                "layers": [0, 1],
                "k": 1,
                "lookahead": [],
                "token_sets": {},
                "entropy": False,
                "kl_final": False,
            },
            "output": {"dir": str(tmp_path / "lean")},
        }
    )
    run_job(spec, show_progress=False)
    summary = json.loads((tmp_path / "lean" / "summary.json").read_text())
    assert summary["layers"][0]["mean_entropy"] is None
    n_blocks = summary["n_blocks"]
    # Convergence is measured over the captured layers: the written ones plus the last.
    assert summary["convergence"]["layers"] == [0, 1, n_blocks]
    result = invoke("report", tmp_path / "lean", "--out", tmp_path / "page")
    assert result.exit_code == 0, result.output
    page = parse(tmp_path / "page" / "index.html")
    assert "token_sets" not in page.sections and "lookahead" not in page.sections
    assert "convergence" in page.sections and (tmp_path / "page" / "convergence.png").exists()


def test_report_names_the_problem_without_a_run(tmp_path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 2
    assert "has no summary.json" in result.output and "codelens run" in result.output


def _browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=90)


def test_report_renders_in_headless_chromium(run, report_index, tmp_path):
    binary = _browser()
    if binary is None:
        pytest.skip(
            "no Chromium here (apt-get install -y chromium; .ci/run installs it when run as root)"
        )
    run_dir, _, _ = run
    index = report_index.resolve()
    # A probe page loads the report in a frame and writes what the browser made of it (decoded
    # image sizes, tables, headings) into its own DOM, which --dump-dom prints.
    probe = tmp_path / "probe.html"
    probe.write_text(
        f'<!DOCTYPE html><html><body><iframe id="f" src="{index.as_uri()}" width="1400" '
        'height="2000"></iframe><pre id="out">pending</pre><script>'
        "document.getElementById('f').addEventListener('load', () => {"
        "const d = document.getElementById('f').contentDocument;"
        "document.getElementById('out').textContent = JSON.stringify({"
        "imgs: [...d.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]),"
        "tables: [...d.querySelectorAll('table')].map(t => t.rows.length),"
        "h2: [...d.querySelectorAll('h2')].map(h => h.textContent)});});"
        "</script></body></html>"
    )
    done = _chromium(
        binary,
        tmp_path / "profile",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    seen = json.loads(dom.split('<pre id="out">', 1)[1].split("</pre>", 1)[0].replace("&amp;", "&"))
    assert len(seen["imgs"]) == 8
    for src, width, height in seen["imgs"]:
        assert width > 500 and height > 300, f"{src} did not load or decode in the browser"
    n_layers = len(json.loads((run_dir / "summary.json").read_text())["layers"])
    assert seen["tables"][-1] == n_layers + 1, "the numbers table has a row per layer"
    assert seen["h2"][0] == "Per-layer curves"

    shot = tmp_path / "report.png"
    done = _chromium(
        binary,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1400,2000",
        index.as_uri(),
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 2000)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "the screenshot is not a blank page"
    if os.environ.get("CODELENS_KEEP_SCREENSHOTS"):  # to look at them: set it to a directory
        shutil.copy(shot, Path(os.environ["CODELENS_KEEP_SCREENSHOTS"]) / "report.png")


def _run_rows_for_text(model: Path, text: str, tmp_path: Path, name: str) -> dict[str, np.ndarray]:
    """Rows of a one-document run over ``text`` (one window, as the plot sees it)."""
    corpus = tmp_path / f"{name}-corpus"
    corpus.mkdir()
    (corpus / "snippet.py").write_text(text)
    spec = validate_spec(
        {
            "name": name,
            "model": {"path": str(model), "device": "cpu"},
            "corpus": {"kind": "files", "paths": [str(corpus / "*.py")]},
            "tokens": {"window": 1024, "overlap": 0},
            "lens": {"k": 1, "lookahead": [], "token_sets": {}},
            "output": {"dir": str(tmp_path / f"{name}-run")},
        }
    )
    run_job(spec, show_progress=False)
    table = pq.read_table(tmp_path / f"{name}-run" / "lens")
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def test_plot_html_cells_are_the_rows_of_a_run_on_the_same_text(run, tmp_path):
    _, model, corpus = run
    out = tmp_path / "grid.html"
    result = invoke(
        "plot", "--model", model, "--file", corpus / "walk.py", "--lines", "3-6", "--out", out
    )
    assert result.exit_code == 0, result.output
    excerpt = "".join(CODE.splitlines(keepends=True)[2:6])
    rows = _run_rows_for_text(model, excerpt, tmp_path, "plot-check")
    top1 = np.stack(rows["topk_ids"])[:, 0]
    by_cell = {
        (int(la), int(p)): i
        for i, (la, p) in enumerate(zip(rows["layer"], rows["pos"], strict=True))
    }
    cells = parse(out).cells
    n_layers = len(set(rows["layer"].tolist()))
    assert len(cells) == len(by_cell) >= n_layers * 40, "a cell per (layer, position); 40+ tokens"
    for cell in cells:
        i = by_cell[int(cell["data-layer"]), int(cell["data-pos"])]
        assert int(cell["data-top1-id"]) == top1[i]
        value, want = float(cell["data-value"]), float(rows["target_logprob"][i])
        assert (np.isnan(value) and np.isnan(want)) or abs(value - want) < 1e-4
    assert "\\n" in out.read_text() and "·" in out.read_text(), "whitespace is shown visibly"

    rank_out = tmp_path / "rank.html"
    assert (
        invoke(
            "plot", "--model", model, "--text", excerpt, "--out", rank_out, "--metric", "rank"
        ).exit_code
        == 0
    )
    for cell in parse(rank_out).cells:
        i = by_cell[int(cell["data-layer"]), int(cell["data-pos"])]
        want = int(rows["target_rank"][i])
        assert (cell["data-value"] == "nan" and want == -1) or float(cell["data-value"]) == want


def test_plot_png_is_a_wide_readable_figure(run, tmp_path):
    _, model, _ = run
    out = tmp_path / "grid.png"
    text = "".join(CODE.splitlines(keepends=True)[:5])  # about 50 tokens: enough, and quick
    result = invoke("plot", "--model", model, "--text", text, "--out", out, "--metric", "kl")
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(out) as image:
        width, height = image.size
    tokens = int(result.output.split("(")[1].split(" tokens")[0])
    assert tokens >= 40 and width >= 60 * tokens, "about 0.6 inch per token"
    assert height >= 300


@pytest.mark.parametrize(
    "args,out_name,message",
    [
        ([], "g.png", "exactly one of --text STR or --file PATH"),
        (["--text", "x", "--file", "y.py"], "g.png", "exactly one of"),
        (["--text", "x", "--lines", "1-2"], "g.png", "--lines needs --file"),
        (["--text", "x"], "g.svg", "must end in .png or .html"),
        (["--text", "x", "--metric", "loss"], "g.png", "--metric 'loss': choose one of logprob"),
    ],
)
def test_plot_bad_arguments_are_named(run, tmp_path, args, out_name, message):
    _, model, _ = run
    result = invoke("plot", "--model", model, "--out", tmp_path / out_name, *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_plot_lines_out_of_range(run, tmp_path):
    _, model, corpus = run
    result = invoke(
        "plot",
        "--model",
        model,
        "--file",
        corpus / "walk.py",
        "--lines",
        "50-60",
        "--out",
        tmp_path / "g.png",
    )
    assert result.exit_code == 2 and "walk.py has 9 lines" in result.output
