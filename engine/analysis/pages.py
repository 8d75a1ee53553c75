"""What the pages of ``codelens report`` and ``codelens compare`` share.

Both pages read a finished run directory the same way, draw the same four per-layer statistics in
PNG figures, and lay out their numbers in the same HTML table inside the same page skeleton and
stylesheet. Keeping these pieces in one place keeps the two pages looking and reading alike: a
change to the stylesheet or to how a number is printed shows on both.

Figures are drawn with matplotlib's object API on the Agg canvas (``Figure`` + ``savefig``), never
through ``pyplot``, so drawing touches no global backend state and needs no display. matplotlib is
imported only when a figure is made, so importing this module stays cheap.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codelens.engine.errors import RunDirError

__all__ = [
    "FIGURE_DPI",
    "PAGE_CSS",
    "PANELS",
    "float_or_nan",
    "format_number",
    "html_page",
    "html_table",
    "load_run",
    "new_figure",
    "save_png",
]

# -- run directories ------------------------------------------------------------------------------


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Read what a page needs from a finished run: ``(summary, job, documents by status)``.

    ``summary`` is ``summary.json``; when the run read only attention sites (``lens.sites:
    [attn]``), its ``attn_layers`` also serve as ``layers``, so that pages always find their
    per-layer rows under ``layers``. ``job`` is ``job.json`` (empty when the run has none) and the
    document counts come from the summary's ``docs_by_status``.

    Raises:
        RunDirError: ``run_dir`` is not a directory, has no ``summary.json`` (the run has not
            finished), or its summary lists no layers (the run wrote no rows).
    """
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        what = "is not a directory" if not run_dir.is_dir() else "has no summary.json"
        raise RunDirError(
            f"{run_dir} {what}: reports and comparisons need a finished run. Run the job "
            "first (codelens run JOB.yaml) and give its output.dir."
        )
    summary = json.loads(summary_file.read_text())
    if not summary.get("layers") and summary.get("attn_layers"):
        summary["layers"] = summary["attn_layers"]  # lens.sites: [attn] only
    if not summary.get("layers"):
        raise RunDirError(f"{summary_file} lists no layers: the run wrote no rows to report on.")
    job_file = run_dir / "job.json"
    job = json.loads(job_file.read_text()) if job_file.exists() else {}
    docs: dict[str, int] = dict(summary.get("docs_by_status") or {})
    return summary, job, docs


# -- figures --------------------------------------------------------------------------------------

FIGURE_DPI = 110
"""Resolution of every PNG figure; with the figures' sizes in inches it fixes their pixel size."""

PANELS: tuple[tuple[str, str, str], ...] = (
    ("mean_target_logprob", "mean log-prob of the true next token", "nats (higher is better)"),
    ("top1_accuracy", "top-1 accuracy (lens top-1 = true next token)", "fraction of tokens"),
    ("mean_kl_final", "KL divergence to the final layer", "nats (0 at the last layer)"),
    ("mean_entropy", "entropy of the lens distribution", "nats"),
)
"""The four per-layer statistics of the 2 x 2 curve figures, in panel order (row by row): the key
in a summary's per-layer entry, the panel's title and the unit of its vertical axis."""


def new_figure(n_rows: int, n_cols: int, width: float, height: float):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches and its grid of axes.

    The axes always come as a 2-D array (``axes[row, col]``), even for a single panel, and the
    layout is constrained so that titles, labels and outside legends do not overlap.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def save_png(fig, path: Path) -> str:
    """Write ``fig`` to ``path`` as a PNG at FIGURE_DPI; returns the file name, which is what a
    page's ``<img src>`` refers to (the page sits next to its figures)."""
    fig.savefig(path, dpi=FIGURE_DPI, format="png")  # Agg, the default canvas for PNG
    return path.name


def float_or_nan(x: float | None) -> float:
    """``x`` as a float, NaN for a missing statistic (``None`` in summary.json), so that a curve
    shows a gap there instead of failing."""
    return math.nan if x is None else float(x)


# -- tables and pages -----------------------------------------------------------------------------


def format_number(x: Any, digits: int = 3) -> str:
    """A number as a table cell shows it: integers with thousands separators, other numbers with
    ``digits`` decimals, and a dash for a missing value (``None`` or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """An HTML table in the pages' ``numbers`` style.

    String cells are shown as they are (escaped), so a caller can pre-format a cell (a layer
    label, a percentage); every other cell goes through ``format_number``.
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(c) if isinstance(c, str) else format_number(c)}</td>" for c in row
        )
        + "</tr>"
        for row in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (
        f'<table class="numbers">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


PAGE_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d2430; background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 6px; border-bottom: 1px solid #d8dce3; padding-bottom: 4px; }
p.lead { color: #4a5568; margin-top: 0; }
p.explain { max-width: 980px; line-height: 1.45; color: #2d3748; }
dl.info { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; background: #fff;
          border: 1px solid #d8dce3; border-radius: 6px; padding: 12px 16px; }
dl.info dt { font-weight: 600; color: #4a5568; } dl.info dd { margin: 0; }
nav a { margin-right: 14px; color: #2b6cb0; text-decoration: none; }
figure { margin: 8px 0; background: #fff; border: 1px solid #d8dce3; border-radius: 6px;
         padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
table.numbers { border-collapse: collapse; background: #fff; font-size: 13px; margin: 8px 0;
                font-variant-numeric: tabular-nums; }
table.numbers th, table.numbers td { border: 1px solid #d8dce3; padding: 4px 8px;
                                     text-align: right; }
table.numbers th { background: #edf0f5; position: sticky; top: 0; }
table.numbers td:first-child, table.numbers th:first-child { text-align: left; }
.scroll { overflow-x: auto; }
footer { color: #718096; font-size: 12px; margin-top: 40px; }
"""
"""The stylesheet embedded in every page, so that a page is one self-contained file (next to its
PNGs) that opens offline."""


def html_page(title: str, body: Sequence[str], footer: str) -> str:
    """A complete HTML page: head with ``title`` and PAGE_CSS, ``title`` again as the heading,
    then the ``body`` fragments and the ``footer``, one per line.

    ``title`` is plain text (escaped here); ``body`` and ``footer`` are HTML, escaped by the
    caller.
    """
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        *body,
        f"<footer>{footer}</footer></main></body></html>",
    ]
    return "\n".join(lines)
