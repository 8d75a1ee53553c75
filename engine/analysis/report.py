"""``codelens report RUN_DIR``: one HTML page with figures and tables from a run's summary.json.

The page (``RUN_DIR/report/index.html``) and its PNG figures are built from ``summary.json`` (the
merged per-shard aggregates), ``job.json`` and ``docs.parquet`` only, never from the row files, so
it takes a second whatever the corpus size. Every figure has a title, labelled axes and a short
explanation written for someone who has not read the code.

Figures are drawn with matplotlib's object API on the Agg canvas (``Figure`` + ``savefig``), never
through ``pyplot``, so building a report touches no global backend state and needs no display.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from codelens.engine.analysis.examples import pick_examples
from codelens.engine.analysis.grid import render_png
from codelens.engine.analysis.pages import (
    PANELS,
    float_or_nan,
    format_number,
    html_page,
    html_table,
    load_run,
    new_figure,
    save_png,
)
from codelens.engine.errors import CodelensError

__all__ = ["CATEGORY_COLORS", "build_report"]

# One fixed colour per syntax category (matplotlib's tab10, which has exactly ten), so a category
# has the same colour in every figure of every report.
CATEGORY_COLORS: dict[str, str] = {
    "keyword": "#1f77b4",
    "name": "#ff7f0e",
    "builtin": "#2ca02c",
    "string": "#d62728",
    "number": "#9467bd",
    "comment": "#8c564b",
    "operator": "#e377c2",
    "punctuation": "#7f7f7f",
    "whitespace": "#bcbd22",
    "other": "#17becf",
}
MIN_GROUP_SHARE = 0.002
"""Categories and languages with fewer than this share of the tokens are left out of the curves
(their means are noise); the tables still list them."""


@dataclass(frozen=True)
class Section:
    """One block of the page: a heading, an explanation and a figure or a table (HTML)."""

    anchor: str
    title: str
    explanation: str
    image: str | None = None
    alt: str = ""
    table_html: str = ""


# -- figures --------------------------------------------------------------------------------------


def _layer_axis(ax, layers: Sequence[int]) -> None:
    ax.set_xlabel("layer (0 = embeddings, last = final block)")
    step = max(1, math.ceil(len(layers) / 16))  # at most ~16 ticks, even for 80-layer models
    ax.set_xticks(list(layers)[::step])
    ax.set_xlim(min(layers) - 0.3, max(layers) + 0.3)
    ax.grid(True, alpha=0.3)


def _curves_figure(
    path: Path,
    layers: Sequence[int],
    series: dict[str, list[dict[str, Any]]],
    colors: dict[str, str] | None,
    title: str,
    legend_title: str,
) -> str:
    """2 x 2 panels (PANELS), one line per series; ``series[name]`` is a per-layer list of stats."""
    fig, axes = new_figure(2, 2, 12, 8)
    fig.suptitle(title, fontsize=13)
    for ax, (key, label, unit) in zip(axes.flat, PANELS, strict=True):
        for name, per_layer in series.items():
            ys = [float_or_nan(s.get(key)) if s else math.nan for s in per_layer]
            color = colors.get(name) if colors else None
            ax.plot(layers, ys, marker="o", markersize=3, label=name, color=color)
        ax.set_title(label, fontsize=11)
        ax.set_ylabel(unit)
        _layer_axis(ax, layers)
    if len(series) > 1:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=9, title=legend_title)
    return save_png(fig, path)


def _overall_figure(path: Path, summary: dict[str, Any]) -> str:
    rows = summary["layers"]
    layers = [r["layer"] for r in rows]
    fig, axes = new_figure(2, 2, 12, 8)
    fig.suptitle("What each layer predicts, over the whole corpus", fontsize=13)
    extra = {
        "top1_accuracy": [
            ("top10_accuracy", "top-10 accuracy", "--"),
            ("top1_agreement_final", "top-1 = final layer's top-1", ":"),
        ]
    }
    for ax, (key, label, unit) in zip(axes.flat, PANELS, strict=True):
        main = "top-1 accuracy" if key == "top1_accuracy" else None
        ax.plot(
            layers,
            [float_or_nan(r.get(key)) for r in rows],
            marker="o",
            color="#1f77b4",
            label=main,
        )
        for other, name, style in extra.get(key, []):
            ax.plot(
                layers, [float_or_nan(r.get(other)) for r in rows], style, marker=".", label=name
            )
        if key in extra:
            ax.legend(fontsize=9)
        ax.set_title(label, fontsize=11)
        ax.set_ylabel(unit)
        _layer_axis(ax, layers)
    return save_png(fig, path)


def _sites_figure(path: Path, summary: dict[str, Any]) -> str:
    """Block-output rows at x = l, attention-site rows at x = l - 0.5 (inside block l)."""
    blocks, attn = summary["layers"], summary["attn_layers"]
    fig, axes = new_figure(2, 2, 12, 8)
    fig.suptitle("Inside each block: after attention vs after the whole block", fontsize=13)
    layers = [r["layer"] for r in blocks]
    for ax, (key, label, unit) in zip(axes.flat, PANELS, strict=True):
        ax.plot(
            layers, [float_or_nan(r.get(key)) for r in blocks], marker="o", label="block output (l)"
        )
        ax.plot(
            [r["layer"] - 0.5 for r in attn],
            [float_or_nan(r.get(key)) for r in attn],
            marker="s",
            linestyle="--",
            label="after attention in block l (l - 0.5)",
        )
        ax.set_title(label, fontsize=11)
        ax.set_ylabel(unit)
        _layer_axis(ax, layers + [r["layer"] - 0.5 for r in attn])
        ax.set_xticks(layers[:: max(1, math.ceil(len(layers) / 16))])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=9, ncols=2)
    return save_png(fig, path)


def _rank_figure(path: Path, summary: dict[str, Any]) -> str:
    rows = summary["layers"]
    layers = [r["layer"] for r in rows]
    fig, axes = new_figure(1, 1, 10, 4.8)
    ax = axes[0, 0]

    def q(name: str) -> list[float]:
        # Ranks start at 0; the plot shows rank + 1 so that rank 0 fits a log axis.
        return [float_or_nan(r["target_rank_quantiles"].get(name)) + 1 for r in rows]

    ax.fill_between(
        layers, q("p10"), q("p90"), alpha=0.15, color="#1f77b4", label="10th-90th percentile"
    )
    ax.fill_between(
        layers, q("p25"), q("p75"), alpha=0.3, color="#1f77b4", label="25th-75th percentile"
    )
    ax.plot(layers, q("p50"), marker="o", color="#1f77b4", label="median")
    ax.set_yscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("rank of the true next token + 1 (log scale; 1 = top-1)")
    ax.set_title("Where the true next token ranks in each layer's lens distribution", fontsize=12)
    _layer_axis(ax, layers)
    ax.legend(fontsize=9)
    return save_png(fig, path)


def _convergence_figure(path: Path, conv: dict[str, Any], shown: list[str]) -> str:
    import numpy as np

    layers = conv["layers"]
    overall = conv["overall"]
    n_panels = 2 if shown else 1
    fig, axes = new_figure(1, n_panels, 7 * n_panels, max(4.5, 0.45 * len(shown) + 2))
    ax = axes[0, 0]
    fractions = [float_or_nan(f) for f in overall["fraction"]]
    ax.bar(layers, fractions, color="#1f77b4")
    for x, f in zip(layers, fractions, strict=True):
        if not math.isnan(f):
            ax.text(x, f, f"{100 * f:.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_title(f"All tokens ({overall['tokens']:,})", fontsize=11)
    ax.set_xlabel("convergence layer")
    ax.set_ylabel("fraction of tokens")
    ax.set_xticks(layers[:: max(1, math.ceil(len(layers) / 16))])
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        "Convergence layer: from which layer on the final prediction stays on top", fontsize=13
    )
    if not shown:
        return save_png(fig, path)

    ax = axes[0, 1]
    by_cat = conv["by_category"]
    grid = np.array([[float_or_nan(f) for f in by_cat[c]["fraction"]] for c in shown])
    image = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{c} (mean {by_cat[c]['mean_layer']:.1f})" for c in shown], fontsize=9)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(layer) for layer in layers], fontsize=8)
    if len(layers) <= 24:  # beyond that the numbers no longer fit their cells
        for i, j in np.ndindex(grid.shape):
            v = grid[i, j]
            if not math.isnan(v) and v >= 0.005:
                color = "white" if v > 0.55 else "black"
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=9, color=color)
    ax.set_xlabel("convergence layer")
    ax.set_title("By syntax category (% of the category's tokens)", fontsize=11)
    fig.colorbar(image, ax=ax, label="fraction of the category's tokens", shrink=0.8)
    return save_png(fig, path)


def _token_set_figure(path: Path, summary: dict[str, Any], languages: Sequence[str]) -> str:
    """Mean set mass per layer: one panel for the corpus, then one per document language when
    there are several (a detour shows as another language's set rising in the middle layers)."""
    rows = summary["layers"]
    layers = [r["layer"] for r in rows]
    names = sorted({name for r in rows for name in r.get("token_set_mean_mass", {})})
    panels: list[tuple[str, list[dict[str, Any]]]] = [("all documents", rows)]
    if len(languages) > 1:
        panels += [
            (f"{lang} documents", [r.get("by_language", {}).get(lang, {}) for r in rows])
            for lang in languages
        ]
    n_cols = 1 if len(panels) == 1 else 2
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = new_figure(n_rows, n_cols, 10 if n_cols == 1 else 12, 4.8 * n_rows)
    fig.suptitle("Token-set mass per layer (the 'detour' measure)", fontsize=13)
    for ax, (title, per_layer) in zip(axes.flat, panels, strict=False):
        for name in names:
            ax.plot(
                layers,
                [float_or_nan((r.get("token_set_mean_mass") or {}).get(name)) for r in per_layer],
                marker="o",
                markersize=3,
                label=name,
            )
        ax.set_yscale("log")
        ax.set_ylabel("mean mass on the set (log)")
        ax.set_title(title, fontsize=11)
        _layer_axis(ax, layers)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=9, title="token set")
    return save_png(fig, path)


def _copy_figure(path: Path, summary: dict[str, Any], buckets: Sequence[str]) -> str:
    """Seen vs novel targets and frequency buckets: mean log-prob per layer, convergence layer."""
    rows = summary["layers"]
    layers = [r["layer"] for r in rows]
    conv = summary.get("convergence") or {}
    fig, axes = new_figure(1, 3, 16, 4.8)
    fig.suptitle("Copying and rare tokens", fontsize=13)
    ax = axes[0, 0]
    for name, style in (("seen", "-"), ("novel", "--")):
        ax.plot(
            layers,
            [
                float_or_nan(r.get("by_seen", {}).get(name, {}).get("mean_target_logprob"))
                for r in rows
            ],
            style,
            marker="o",
            markersize=3,
            label=f"{name} target",
        )
    ax.set_title("seen earlier in the file vs novel", fontsize=11)
    ax.set_ylabel("mean log-prob of the true next token (nats)")
    ax.legend(fontsize=9)
    _layer_axis(ax, layers)
    ax = axes[0, 1]
    cmap = _bucket_colors(len(buckets))
    for color, name in zip(cmap, buckets, strict=True):
        ax.plot(
            layers,
            [
                float_or_nan(r.get("by_freq_bucket", {}).get(name, {}).get("mean_target_logprob"))
                for r in rows
            ],
            marker="o",
            markersize=3,
            color=color,
            label=_bucket_label(name),
        )
    ax.set_title("by the target's corpus count", fontsize=11)
    ax.set_ylabel("mean log-prob (nats)")
    ax.legend(fontsize=8, title="corpus count", ncol=2)
    _layer_axis(ax, layers)
    ax = axes[0, 2]
    labels, means = [], []
    for kind, names in (("seen", ["seen", "novel"]), ("freq_bucket", list(buckets))):
        for name in names:
            mean = (conv.get(f"by_{kind}", {}).get(name) or {}).get("mean_layer")
            if mean is not None:
                labels.append(f"{name} target" if kind == "seen" else _bucket_label(name))
                means.append(mean)
    ax.barh(range(len(means)), means, color="#1f77b4")
    ax.set_yticks(range(len(means)))
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("mean convergence layer")
    ax.set_title("when the final prediction settles", fontsize=11)
    return save_png(fig, path)


def _bucket_label(name: str) -> str:
    b = int(name)
    return "1" if b == 0 else f"{2**b}-{2 ** (b + 1) - 1}"


def _bucket_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _lookahead_figure(path: Path, summary: dict[str, Any]) -> str:
    rows = summary["layers"]
    layers = [r["layer"] for r in rows]
    offsets = [a["offset"] for a in rows[0]["lookahead"]]
    fig, axes = new_figure(1, 2, 13, 4.8)
    for ax, key, label, unit in (
        (
            axes[0, 0],
            "top1_accuracy",
            "top-1 accuracy of the token o positions ahead",
            "fraction of tokens",
        ),
        (axes[0, 1], "mean_logprob", "mean log-prob of the token o positions ahead", "nats"),
    ):
        own = "top1_accuracy" if key == "top1_accuracy" else "mean_target_logprob"
        ax.plot(
            layers, [float_or_nan(r.get(own)) for r in rows], marker="o", label="o = 1 (next token)"
        )
        for a, off in enumerate(offsets):
            ax.plot(
                layers,
                [float_or_nan(r["lookahead"][a].get(key)) for r in rows],
                marker="o",
                label=f"o = {off}",
            )
        ax.set_title(label, fontsize=11)
        ax.set_ylabel(unit)
        _layer_axis(ax, layers)
        ax.legend(fontsize=9)
    fig.suptitle("Look-ahead: does a layer already encode tokens further ahead?", fontsize=13)
    return save_png(fig, path)


def _positions_figure(
    path: Path,
    summary: dict[str, Any],
    layers: Sequence[int],
    positions: list[str],
    columns: list[str],
) -> str:
    """Mean log-prob and top-1 accuracy per layer, one line per bucket: document position (top),
    column in the line (bottom)."""
    from matplotlib import colormaps

    fig, axes = new_figure(2, 2, 12, 8)
    fig.suptitle("Per-layer curves by position bucket (log2)", fontsize=13)
    for row, (kind, names, what) in enumerate(
        (("position", positions, "position in the document"), ("column", columns, "column"))
    ):
        cmap = colormaps["viridis"]
        for ax, (key, label, unit) in zip(axes[row], PANELS[:2], strict=True):
            for i, name in enumerate(names):
                ys = [
                    float_or_nan(s.get(key)) if s else math.nan
                    for s in _per_layer(summary, kind, name)
                ]
                color = cmap(i / max(1, len(names) - 1))
                ax.plot(layers, ys, marker="o", markersize=3, color=color, label=name)
            ax.set_title(f"{label}, by {what}", fontsize=11)
            ax.set_ylabel(unit)
            _layer_axis(ax, layers)
        if names:
            axes[row, 1].legend(fontsize=8, title=what, loc="center left", bbox_to_anchor=(1, 0.5))
    return save_png(fig, path)


# -- tables ---------------------------------------------------------------------------------------


def _sites_table(summary: dict[str, Any]) -> str:
    """Block and attn rows interleaved in depth order."""
    rows = [(r["layer"], 1, "block", r) for r in summary["layers"]]
    rows += [(r["layer"], 0, "attn", r) for r in summary["attn_layers"]]
    body = [
        [
            f"{layer} ({site})",
            r["count"],
            r["mean_target_logprob"],
            r["top1_accuracy"],
            r["mean_kl_final"],
            r["mean_entropy"],
        ]
        for layer, _, site, r in sorted(rows, key=lambda x: (x[0], x[1]))
    ]
    return html_table(
        ["layer (site)", "tokens", "mean log-prob", "top-1 acc", "KL to final", "entropy"], body
    )


def _sci(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2g}"


def _layer_table(summary: dict[str, Any]) -> str:
    rows = summary["layers"]
    offsets = [a["offset"] for a in rows[0]["lookahead"]]
    sets = sorted(rows[0].get("token_set_mean_mass", {}))
    header = [
        "layer",
        "tokens",
        "mean log-prob",
        "median rank (bin from)",
        "top-1 acc",
        "top-10 acc",
        "agrees with final",
        "KL to final",
        "entropy",
        *[f"top-1 acc o={o}" for o in offsets],
        *[f"mass {s}" for s in sets],
    ]
    body = []
    for r in rows:
        body.append(
            [
                str(r["layer"]),
                r["count"],
                r["mean_target_logprob"],
                r["target_rank_quantiles"]["p50"],
                r["top1_accuracy"],
                r["top10_accuracy"],
                r["top1_agreement_final"],
                r["mean_kl_final"],
                r["mean_entropy"],
                *[a["top1_accuracy"] for a in r["lookahead"]],
                *[r["token_set_mean_mass"].get(s) for s in sets],
            ]
        )
    return html_table(header, body)


def _group_table(summary: dict[str, Any], kind: str) -> str:
    """Per category / language: share, final-layer quality, convergence layer."""
    final = summary["layers"][-1]
    groups = final.get(f"by_{kind}", {})
    conv = (summary.get("convergence") or {}).get(f"by_{kind}", {})
    total = sum(g["rows"] for g in groups.values()) or 1
    header = [
        kind,
        "tokens",
        "share",
        f"top-1 acc (layer {final['layer']})",
        f"mean log-prob (layer {final['layer']})",
        "median rank (bin from)",
        "mean convergence layer",
        "median convergence layer",
    ]
    body = []
    for name, g in groups.items():
        c = conv.get(name, {})
        body.append(
            [
                name,
                g["rows"],
                f"{100 * g['rows'] / total:.1f}%",
                g["top1_accuracy"],
                g["mean_target_logprob"],
                g["target_rank_quantiles"]["p50"],
                c.get("mean_layer"),
                c.get("median_layer"),
            ]
        )
    return html_table(header, body)


# -- page -----------------------------------------------------------------------------------------


def _shown_groups(summary: dict[str, Any], kind: str) -> list[str]:
    """Groups with at least MIN_GROUP_SHARE of the final layer's rows, in summary order."""
    groups = summary["layers"][-1].get(f"by_{kind}", {})
    total = sum(g["rows"] for g in groups.values())
    return [name for name, g in groups.items() if total and g["rows"] / total >= MIN_GROUP_SHARE]


def _per_layer(summary: dict[str, Any], kind: str, name: str) -> list[dict[str, Any]]:
    return [r.get(f"by_{kind}", {}).get(name, {}) for r in summary["layers"]]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report of a finished run.

    Args:
        run_dir: the run directory (holds summary.json).
        out_dir: where to write ``index.html`` and the PNGs; default ``RUN_DIR/report``.

    Returns:
        The path of ``index.html``.

    Raises:
        RunDirError: the directory holds no finished run (no summary.json).
    """
    run_dir = Path(run_dir)
    summary, job, docs = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()  # figures a previous report drew for a statistic this run switched off
    resolved = job.get("resolved", {})
    n_blocks = summary.get("n_blocks") or resolved.get("n_blocks")
    layers = [r["layer"] for r in summary["layers"]]
    categories = _shown_groups(summary, "category")
    languages = _shown_groups(summary, "language")
    positions = _shown_groups(summary, "position")
    columns = _shown_groups(summary, "column")
    first, last = summary["layers"][0], summary["layers"][-1]
    sections: list[Section] = []

    def add(
        anchor: str,
        title: str,
        explanation: str,
        draw: Callable[[Path], str] | None,
        alt: str,
        table_html: str = "",
    ) -> None:
        image = draw(out / f"{anchor}.png") if draw else None
        sections.append(Section(anchor, title, explanation, image, alt, table_html))

    add(
        "layers",
        "Per-layer curves",
        "Each layer's residual stream is read through the model's own final norm and unembedding "
        "(the logit lens), giving a next-token distribution per layer. Top left: the mean log-"
        "probability that distribution gives to the token that actually comes next (higher is "
        "better). Top right: how often its most likely token is the true next token, how often "
        "the true token is among its 10 most likely, and how often its top-1 equals the final "
        "layer's top-1. Bottom: the KL divergence from the final layer's distribution (how far "
        "the layer still is from the model's output) and the entropy (how spread out it is).",
        lambda p: _overall_figure(p, summary),
        "Four line charts over layers: mean log-prob, top-1 accuracy, KL to final, entropy",
    )
    if summary.get("attn_layers") and summary.get("layers") is not summary.get("attn_layers"):
        add(
            "sites",
            "After attention vs after the block",
            "With lens.sites including 'attn', the lens also reads the residual stream inside "
            "each block l right after its attention sublayer (drawn at l - 0.5, between the "
            "block's input l - 1 and its output l). The gap between a dashed point and the next "
            "solid one is what block l's MLP adds; the gap from the previous solid point is what "
            "its attention adds. KL is to the final block output in both.",
            lambda p: _sites_figure(p, summary),
            "Four line charts over layers, block outputs and post-attention points interleaved",
            _sites_table(summary),
        )
    if categories:
        add(
            "categories",
            "By syntax category",
            "The same four curves, split by the syntax category of the token the prediction is "
            "made at (from Pygments; e.g. 'keyword' rows are predictions made while reading a "
            "keyword). Categories with less than "
            f"{100 * MIN_GROUP_SHARE:.1f}% of the tokens are left out of the curves.",
            lambda p: _curves_figure(
                p,
                layers,
                {c: _per_layer(summary, "category", c) for c in categories},
                CATEGORY_COLORS,
                "Per-layer curves by syntax category",
                "syntax category",
            ),
            "Four line charts over layers with one line per syntax category",
            _group_table(summary, "category"),
        )
    if len(languages) > 1:
        add(
            "languages",
            "By language",
            "The same curves split by the documents' language (from the file extension or the "
            "corpus' language field).",
            lambda p: _curves_figure(
                p,
                layers,
                {g: _per_layer(summary, "language", g) for g in languages},
                None,
                "Per-layer curves by language",
                "language",
            ),
            "Four line charts over layers with one line per language",
            _group_table(summary, "language"),
        )
    elif languages:
        sections.append(
            Section(
                "languages",
                "By language",
                f"Every document of this run is {languages[0]}.",
                None,
                "",
                _group_table(summary, "language"),
            )
        )
    if len(positions) > 1 or len(columns) > 1:

        def draw_positions(p: Path) -> str:
            return _positions_figure(p, summary, layers, positions, columns)

        add(
            "positions",
            "By position",
            "Left half: the four curves by the token's position in its document, in log2 buckets "
            "(0, 1, 2-3, 4-7, ...): early tokens have little context, so their layers converge "
            "later and less. The tables give the final layer's figures and the mean convergence "
            "layer per bucket, by position in the document and by column (the token's byte "
            f"offset from its line's start). Buckets with less than {100 * MIN_GROUP_SHARE:.1f}% "
            "of the tokens are left out of the curves.",
            draw_positions,
            "Line charts over layers with one line per position bucket and per column bucket",
            _group_table(summary, "position") + _group_table(summary, "column"),
        )
    add(
        "ranks",
        "Rank of the true next token",
        "The spread of the true next token's rank in each layer's distribution (0 = it is the most "
        "likely token). Quantiles come from log2-binned histograms, so each value is the lower "
        "edge of its bin (exact for ranks 0 and 1).",
        lambda p: _rank_figure(p, summary),
        "Median and percentile bands of the target rank over layers, log scale",
    )
    conv = summary.get("convergence")
    if conv and conv["overall"]["tokens"]:
        conv_categories = [c for c in categories if c in conv.get("by_category", {})]
        add(
            "convergence",
            "Convergence layer",
            "For each token, the convergence layer is the first layer from which the final "
            "layer's top-1 prediction is also the top-1 at every later layer: the depth at which "
            "the model has settled on what it will output (the last layer when only the output "
            "has it). Left: the share of tokens per convergence layer; right: the same per "
            "syntax category (each row sums to 100%; the label gives the category's mean).",
            lambda p: _convergence_figure(p, conv, conv_categories),
            "Bar chart of convergence layers and a category-by-layer heat map",
        )
    if first.get("token_set_mean_mass"):
        add(
            "token_sets",
            "Token sets (detour)",
            "The mean probability each layer puts on each named token set of the job "
            "(lens.token_sets). A set of another language's tokens that peaks in the middle "
            "layers is a detour: the model passes through those tokens before settling on its "
            "output.",
            lambda p: _token_set_figure(p, summary, languages),
            "Line charts of the mean mass per token set over layers, log scale, for the corpus "
            "and per document language",
        )
    if first.get("lookahead"):
        add(
            "lookahead",
            "Look-ahead",
            "Does a layer already predict tokens further ahead than the next one? Each line is "
            "the top-1 accuracy (left) and mean log-prob (right) of the token o positions ahead "
            "(o = 1 is the ordinary next token); a line above chance in early or middle layers "
            "means those layers encode more than the immediate next token.",
            lambda p: _lookahead_figure(p, summary),
            "Line charts of look-ahead accuracy and log-prob per offset over layers",
        )
    sections.extend(_seed_sections(run_dir, out, summary, job))
    sections.append(
        Section(
            "table",
            "Numbers per layer",
            "The figures' numbers (from summary.json). Means of log-prob and accuracy are over "
            "tokens that have a next token; KL, entropy and masses over all tokens with a finite "
            "residual.",
            table_html=_layer_table(summary),
        )
    )

    info = [
        ("run", summary.get("name")),
        (
            "model",
            f"{resolved.get('family', summary.get('model_family'))} · {n_blocks} blocks · "
            f"{resolved.get('model_class', '')}",
        ),
        ("tokens", f"{summary.get('tokens', 0):,} in {summary.get('shards', 0)} shard(s)"),
        ("documents", ", ".join(f"{k}: {v:,}" for k, v in docs.items()) or "–"),
        (
            "lens",
            f"{resolved.get('impl', '?')} on {resolved.get('device', '?')} "
            f"({resolved.get('dtype', '?')}), load-time self-check max |lens - logits| "
            f"{_sci(resolved.get('self_check_max_abs_err'))}",
        ),
        (
            "lens variant",
            "sites: "
            + ", ".join((job.get("spec", {}).get("lens", {}) or {}).get("sites", ["block"]))
            + f"; last blocks as decoder: "
            f"{(job.get('spec', {}).get('lens', {}) or {}).get('decoder_blocks', 0) or 'no'}",
        ),
        (
            "final layer",
            f"top-1 accuracy {format_number(last.get('top1_accuracy'))}, mean log-prob "
            f"{format_number(last.get('mean_target_logprob'))}",
        ),
        ("syntax", f"Pygments {summary.get('syntax', {}).get('pygments') or '?'}"),
    ]
    (out / "index.html").write_text(_page(summary, info, sections), encoding="utf-8")
    return out / "index.html"


def _first_block_sentence(summary: dict[str, Any]) -> str:
    """Seed 003's finding on this run: how much of the KL to the output the first block removes."""
    rows = summary["layers"]
    if len(rows) < 3 or rows[0]["layer"] != 0 or rows[1]["layer"] != 1:
        return ""
    kl = [r.get("mean_kl_final") for r in rows]
    if any(x is None for x in kl) or not kl[0]:
        return ""
    drops = [a - b for a, b in zip(kl, kl[1:], strict=False)]
    share = 100 * drops[0] / kl[0]
    if drops[0] > 0 and drops[0] == max(drops):
        return (
            f" The first block does the most: the KL to the output falls from {kl[0]:.2f} nats "
            f"at the embeddings to {kl[1]:.2f} after block 1 ({share:.0f}% of it), so layer 0 "
            "says little about what later layers will predict."
        )
    return (
        f" The KL to the output goes from {kl[0]:.2f} nats at the embeddings to {kl[1]:.2f} "
        f"after block 1 ({share:.0f}% of it); the largest drop is after block "
        f"{rows[1 + drops.index(max(drops))]['layer']}."
    )


def _seed_sections(
    run_dir: Path, out: Path, summary: dict[str, Any], job: dict[str, Any]
) -> list[Section]:
    """The seeds' questions: copying and rare tokens (curves and table), then the examples."""
    first = summary["layers"][0]
    if not first.get("by_seen"):
        return []  # a run written before the copy columns existed
    buckets = _shown_groups(summary, "freq_bucket")
    sections = [
        Section(
            "copying",
            "Copying and rare tokens",
            "Is a token predicted by copying it from earlier in the file, and from which layer? "
            "Left: mean log-prob per layer of targets that already occur earlier in the same "
            "document (seen) and of those that do not (novel). Middle: the same by how often the "
            "target occurs in the whole corpus (log2 buckets; rare tokens at the dark end). "
            "Right: the mean convergence layer of each group. A seen target that stays "
            "unlikely until the last layers is the late copying the seeds describe; the tables "
            "add tokens whose whole line repeats an earlier line." + _first_block_sentence(summary),
            _copy_figure(out / "copying.png", summary, buckets),
            "Line charts of mean log-prob per layer for seen / novel targets and by corpus "
            "frequency, and a bar chart of mean convergence layers",
            _group_table(summary, "seen")
            + _group_table(summary, "freq_bucket")
            + _group_table(summary, "line_repeat"),
        )
    ]
    try:
        tokenizer = _tokenizer(job)
    except (CodelensError, OSError, ValueError) as e:  # the rest of the report stands
        return [
            *sections,
            Section(
                "examples",
                "Examples",
                f"No examples: the model's tokenizer could not be loaded here ({e}).",
            ),
        ]
    import pyarrow.parquet as pq

    docs = {d["doc"]: d for d in pq.read_table(run_dir / "docs.parquet").to_pylist()}
    for n, ex in enumerate(pick_examples(run_dir, summary, docs, tokenizer), start=1):
        image = out / f"example-{n}.png"
        render_png(ex.grid, "logprob", image, title=ex.title)
        sections.append(
            Section(
                f"example-{n}",
                f"Example {n}: {ex.title}",
                ex.look_for
                + " Each cell is a layer's most likely next token, coloured by the log-prob the "
                "layer gives the true next token (bold: the top-1 is right).",
                image.name,
                f"Lens grid around the picked token ({ex.rule})",
            )
        )
    return sections


def _tokenizer(job: dict[str, Any]) -> Any:
    """The run's tokenizer, loaded from the model path its job.json names."""
    from codelens.engine.model.loading import load_tokenizer

    model = (job.get("spec") or {}).get("model") or {}
    if not model.get("path"):
        raise ValueError("job.json names no model")
    return load_tokenizer(
        model["path"],
        revision=model.get("revision"),
        allow_pickle=bool(model.get("allow_pickle")),
        trust_remote_code=bool(model.get("trust_remote_code")),
    )


def _page(summary: dict[str, Any], info: list[tuple[str, Any]], sections: list[Section]) -> str:
    title = f"Logit-lens report: {summary.get('name') or 'run'}"
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        '<p class="lead">What each layer of the model predicts about the next token of source '
        "code, read through the model's own output head (the logit lens), aggregated over the "
        "whole corpus.</p>",
        '<dl class="info">'
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in info)
        + "</dl>",
        f"<nav>{nav}</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        parts.append(f'<p class="explain">{html.escape(s.explanation)}</p>')
        if s.image:
            parts.append(
                f'<figure><img src="{html.escape(s.image)}" alt="{html.escape(s.alt)}"></figure>'
            )
        if s.table_html:
            parts.append(f'<div class="scroll">{s.table_html}</div>')
        parts.append("</section>")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    footer = (
        f"Generated by codelens report at {stamp} from summary.json "
        f"({html.escape(summary.get('quantile_method', ''))})."
    )
    return html_page(title, parts, footer)
