"""``codelens report`` and ``codelens plot`` from the CLI on a real run, the report opened in
headless Chromium as a user would, and the plot grid's cells checked against a run's rows."""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory, write_corpus, job_spec):
    """A finished run over two Python files and a JavaScript file; returns (run dir, model dir)."""
    root = tmp_path_factory.mktemp("report")
    corpus = write_corpus(
        root / "corpus",
        {"walk.py": CODE, "more.py": CODE.replace("walk", "scan") * 2, "add.js": JS},
    )
    model = tiny_model_dir("llama")
    spec = job_spec(
        model,
        corpus,
        root / "run",
        glob="*",
        name="report-test",
        tokens={"window": 512, "overlap": 16},
        lens={"k": 3, "lookahead": [2], "token_sets": {"py": ["def", "self"], "js": ["function"]}},
        output={"shard_tokens": 200},
    )
    run_job(spec, show_progress=False)
    return root / "run", model, corpus


@pytest.fixture(scope="module")
def report_index(run, invoke) -> Path:
    """The report of the run, built once from the CLI for the tests that read it."""
    run_dir, _, _ = run
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("index.html")
    return run_dir / "report" / "index.html"


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
        "copying",
        # The random tiny model copies nothing; its detour and look-ahead picks are shown.
        "example-1",
        "example-2",
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
    assert "A detour through the" in text and "tokens ahead" in text
    assert "seen" in text and "novel" in text and "not_repeated" in text


def test_report_of_a_lean_run_leaves_out_what_was_not_computed(
    tiny_model_dir, run, tmp_path, job_spec, invoke
):
    """Selected layers, no look-ahead, token sets, entropy or KL: the page says what there is."""
    _, _, corpus = run
    lens = {
        "layers": [0, 1],
        "k": 1,
        "lookahead": [],
        "token_sets": {},
        "entropy": False,
        "kl_final": False,
    }
    run_job(
        job_spec(tiny_model_dir("llama"), corpus, tmp_path / "lean", lens=lens), show_progress=False
    )
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


def test_report_names_the_problem_without_a_run(tmp_path, invoke):
    result = invoke("report", tmp_path)
    assert result.exit_code == 2
    assert "has no summary.json" in result.output and "codelens run" in result.output


def test_report_renders_in_headless_chromium(run, report_index, tmp_path, chromium):
    run_dir, _, _ = run
    index = report_index.resolve()
    seen = chromium.inspect(index, tmp_path)
    assert len(seen["imgs"]) == 11  # 8 figures, the copying figure and 2 example grids
    for src, width, height in seen["imgs"]:
        assert width > 500 and height > 300, f"{src} did not load or decode in the browser"
    n_layers = len(json.loads((run_dir / "summary.json").read_text())["layers"])
    assert seen["tables"][-1] == n_layers + 1, "the numbers table has a row per layer"
    assert seen["h2"][0] == "Per-layer curves"

    shot = tmp_path / "report.png"
    done = chromium.run(
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


def test_plot_html_cells_are_the_rows_of_a_run_on_the_same_text(
    run, tmp_path, invoke, write_corpus, job_spec, read_rows
):
    _, model, corpus = run
    out = tmp_path / "grid.html"
    result = invoke(
        "plot", "--model", model, "--file", corpus / "walk.py", "--lines", "3-6", "--out", out
    )
    assert result.exit_code == 0, result.output
    excerpt = "".join(CODE.splitlines(keepends=True)[2:6])
    # The rows of a one-document run over the excerpt (one window, as the plot sees it).
    spec = job_spec(
        model,
        write_corpus(tmp_path / "plot-check-corpus", {"snippet.py": excerpt}),
        tmp_path / "plot-check-run",
        name="plot-check",
        tokens={"window": 1024, "overlap": 0},
        lens={"k": 1, "lookahead": [], "token_sets": {}},
    )
    run_job(spec, show_progress=False)
    rows = read_rows(tmp_path / "plot-check-run")
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


def test_plot_png_is_a_wide_readable_figure(run, tmp_path, invoke):
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
def test_plot_bad_arguments_are_named(run, tmp_path, invoke, args, out_name, message):
    _, model, _ = run
    result = invoke("plot", "--model", model, "--out", tmp_path / out_name, *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_plot_lines_out_of_range(run, tmp_path, invoke):
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
