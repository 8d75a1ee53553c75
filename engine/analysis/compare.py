"""``codelens compare RUN_DIR... --out DIR``: several runs' per-layer curves on one page.

Models of different depths are put on a common **relative depth** axis, ``layer / L`` (0 = the
embeddings, 1 = the last block's output), and the four per-layer curves of ``codelens report``
(mean log-prob of the true next token, top-1 accuracy, KL to the final layer, entropy) are overlaid,
one line per run, with a table of the numbers. Like the report, it reads only ``summary.json``,
``job.json`` and ``docs.parquet``.

The runs must have read the same corpus: ``docs.parquet`` must list the same documents (``source``)
in the same order with the same status, and, where two runs used the same tokenizer (the same
``resolved.tokenizer_vocab`` and model family), the same token counts. Different corpora are
refused unless ``allow_different_corpora`` (the curves then compare different text).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

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
from codelens.engine.errors import RunDirError

__all__ = ["build_comparison", "corpus_differences"]


def _label(run_dir: Path, summary: dict[str, Any], job: dict[str, Any], used: set[str]) -> str:
    resolved = job.get("resolved", {})
    base = (
        f"{summary.get('name') or run_dir.name} "
        f"({resolved.get('family', '?')}, L={summary.get('n_blocks')})"
    )
    label, i = base, 2
    while label in used:
        label, i = f"{base} #{i}", i + 1
    used.add(label)
    return label


def _docs(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "docs.parquet"
    if not path.exists():
        raise RunDirError(f"{run_dir} has no docs.parquet: it is not a finished run directory")
    return pq.read_table(path, columns=["source", "n_tokens", "status"]).to_pylist()


def corpus_differences(run_dirs: Sequence[Path]) -> list[str]:
    """Why the runs' corpora differ (empty when they are the same; see the module docstring)."""
    first_dir = Path(run_dirs[0])
    first = _docs(first_dir)
    first_job = load_run(first_dir)[1].get("resolved", {})
    problems = []
    for other_dir in run_dirs[1:]:
        other_dir = Path(other_dir)
        other = _docs(other_dir)
        job = load_run(other_dir)[1].get("resolved", {})
        a = [(d["source"], d["status"]) for d in first]
        b = [(d["source"], d["status"]) for d in other]
        if a != b:
            only = sorted({s for s, _ in a} ^ {s for s, _ in b})
            detail = (
                f"documents only in one of them: {only[:3]}"
                if only
                else "same documents, different order or status"
            )
            problems.append(f"{other_dir} and {first_dir} read different documents ({detail})")
            continue
        same_tokenizer = first_job.get("tokenizer_vocab") == job.get("tokenizer_vocab") and (
            first_job.get("family") == job.get("family")
        )
        if same_tokenizer and [d["n_tokens"] for d in first] != [d["n_tokens"] for d in other]:
            problems.append(
                f"{other_dir} and {first_dir} have the same documents and tokenizer but different "
                "token counts (the files changed between the runs?)"
            )
    return problems


def _relative(entries: list[dict[str, Any]], n_blocks: int) -> list[float]:
    return [e["layer"] / n_blocks for e in entries]


def _comparison_figure(path: Path, runs: list[tuple[str, dict[str, Any]]]) -> str:
    fig, axes = new_figure(2, 2, 12, 8)
    fig.suptitle("Per-layer curves of several runs, on relative depth (layer / L)", fontsize=13)
    for ax, (key, label, unit) in zip(axes.flat, PANELS, strict=True):
        for name, summary in runs:
            rows = summary["layers"]
            xs = _relative(rows, summary["n_blocks"])
            ax.plot(
                xs, [float_or_nan(r.get(key)) for r in rows], marker="o", markersize=3, label=name
            )
        ax.set_title(label, fontsize=11)
        ax.set_ylabel(unit)
        ax.set_xlabel("relative depth: layer / L (0 = embeddings, 1 = last block)")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=9, ncols=min(3, len(runs)))
    return save_png(fig, path)


def build_comparison(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, allow_different_corpora: bool = False
) -> Path:
    """Write ``OUT/index.html`` and ``OUT/compare.png`` comparing ``run_dirs``; returns the page.

    Raises:
        RunDirError: fewer than two runs, a directory without a finished run, or runs over
            different corpora without ``allow_different_corpora``.
    """
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise RunDirError(
            "codelens compare needs at least two run directories (or one and --with-default, "
            "which runs the bundled model over that run's corpus beside it)"
        )
    loaded = []
    for d in dirs:
        summary, job, _ = load_run(d)
        n_blocks = summary.get("n_blocks") or job.get("resolved", {}).get("n_blocks")
        if not n_blocks:
            raise RunDirError(f"{d}/summary.json does not say how many blocks the model has")
        summary = {**summary, "n_blocks": n_blocks}
        loaded.append((d, summary, job))
    problems = corpus_differences(dirs)
    if problems and not allow_different_corpora:
        raise RunDirError(
            "the runs read different corpora, so their curves are not comparable: "
            + "; ".join(problems)
            + ". Pass --allow-different-corpora to compare them anyway."
        )
    used: set[str] = set()
    runs = [(_label(d, s, j, used), s) for d, s, j in loaded]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = _comparison_figure(out / "compare.png", runs)

    header = [
        "run",
        "layer",
        "layer / L",
        "tokens",
        "mean log-prob",
        "top-1 acc",
        "KL to final",
        "entropy",
    ]
    body = [
        [
            name,
            str(r["layer"]),
            f"{r['layer'] / s['n_blocks']:.2f}",
            r["count"],
            r["mean_target_logprob"],
            r["top1_accuracy"],
            r["mean_kl_final"],
            r["mean_entropy"],
        ]
        for name, s in runs
        for r in s["layers"]
    ]
    info = "".join(
        f"<dt>{html.escape(name)}</dt><dd>{html.escape(str(d))} · {s.get('tokens', 0):,} tokens · "
        f"final top-1 {format_number(s['layers'][-1].get('top1_accuracy'))}</dd>"
        for (name, s), (d, _, _) in zip(runs, loaded, strict=True)
    )
    warning = ""
    if problems:
        warning = (
            '<p class="explain"><strong>Warning: the runs read different corpora</strong> '
            "(--allow-different-corpora): " + html.escape("; ".join(problems)) + "</p>"
        )
    title = "Logit-lens comparison: " + ", ".join(name for name, _ in runs)
    page = html_page(
        title,
        [
            '<p class="lead">Several runs of the logit lens over the same corpus, each model\'s '
            "layers placed at their relative depth (layer / L), so that models of different "
            "depths share one axis.</p>",
            f'<dl class="info">{info}</dl>',
            warning,
            '<section id="curves"><h2>Per-layer curves</h2>',
            '<p class="explain">Mean log-probability of the true next token (higher is better), '
            "top-1 accuracy, KL divergence to the model's own final layer and entropy of each "
            "layer's lens distribution, one line per run. 0 on the horizontal axis is the "
            "embedding output, 1 the last block's output (which the model's head reads).</p>",
            f'<figure><img src="{html.escape(image)}" alt="Four line charts over relative depth, '
            'one line per run"></figure></section>',
            '<section id="table"><h2>Numbers per layer</h2>',
            "<p class=\"explain\">The figure's numbers, from each run's summary.json.</p>",
            f'<div class="scroll">{html_table(header, body)}</div></section>',
        ],
        "Generated by codelens compare.",
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
