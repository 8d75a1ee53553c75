"""``codelens plot``: the classic per-prompt logit-lens grid (nostalgebraist's) for one text.

Rows are layers (the final layer on top, the embeddings at the bottom), columns are positions; each
cell shows the top-1 token that layer predicts for the *next* position, coloured by a value of that
cell: the true next token's log-prob or rank, the KL divergence to the final layer, or the entropy.
The column labels show the input token at the bottom and the true next token at the top; a cell
whose top-1 is the true next token is bold (and underlined in HTML).

The numbers come from the same engine path as a batch run: ``load_model`` (with its self-check),
``ResidualCapture`` hooks and ``kernels.lens_stats``, on the text tokenized exactly as a corpus
document (the backend tokenizer, no special tokens, a BOS in front when the model has one), so a
cell equals the row of a run over the same text.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codelens.engine.data.tokenize import backend_tokenizer
from codelens.engine.errors import CodelensError
from codelens.engine.model.loading import LoadedModel
from codelens.engine.run.pipeline import LensPipeline, TextInput
from codelens.engine.run.request import resolve_lens
from codelens.engine.schemas import LensSpec

__all__ = [
    "METRICS",
    "LensGrid",
    "compute_grid",
    "grid_figure",
    "read_lines",
    "render_html",
    "render_png",
    "token_texts",
    "visible",
]

MAX_TOKENS = 512
"""The most positions one grid shows: beyond that no figure stays readable (use --lines)."""


@dataclass(frozen=True)
class Metric:
    """How one cell value is computed, named and coloured."""

    name: str
    label: str
    cmap: str
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    "logprob": Metric("logprob", "log-prob of the true next token (nats)", "viridis", True),
    "rank": Metric(
        "rank", "rank of the true next token (0 = top-1; log colour scale)", "viridis_r", False
    ),
    "kl": Metric("kl", "KL divergence to the final layer (nats)", "magma_r", False),
    "entropy": Metric("entropy", "entropy of the layer's prediction (nats)", "cividis_r", False),
}


class PlotError(CodelensError):
    """The text cannot be plotted (empty, too long, bad --lines)."""


@dataclass(frozen=True)
class LensGrid:
    """Lens statistics of one text at every layer.

    Attributes:
        layers: layer numbers, ascending (0 = embeddings, L = last block).
        token_ids: the text's token ids (``[T]``; no BOS).
        top1_ids: ``[n_layers, T]`` each layer's most likely next token.
        top1_logprob: ``[n_layers, T]`` its log-prob.
        logprob: ``[n_layers, T]`` log-prob of the true next token (NaN at the last position).
        rank: ``[n_layers, T]`` its rank (-1 at the last position).
        kl: ``[n_layers, T]`` KL(final || layer), nats.
        entropy: ``[n_layers, T]`` nats.
        token_text: ``[T]`` each input token as text.
        top1_text: ``[n_layers][T]`` each top-1 token as text.
        first_line: the source line of the text's first character (1 without --lines).
    """

    layers: list[int]
    token_ids: list[int]
    top1_ids: np.ndarray
    top1_logprob: np.ndarray
    logprob: np.ndarray
    rank: np.ndarray
    kl: np.ndarray
    entropy: np.ndarray
    token_text: list[str]
    top1_text: list[list[str]]
    first_line: int = 1

    @property
    def target_ids(self) -> list[int]:
        """The true next token of each position (-1 at the last)."""
        return self.token_ids[1:] + [-1]

    def values(self, metric: str) -> np.ndarray:
        """The ``[n_layers, T]`` values a metric colours by (float, NaN where undefined)."""
        if metric == "rank":
            return np.where(self.rank >= 0, self.rank, np.nan).astype(np.float64)
        return getattr(self, metric).astype(np.float64)


def visible(text: str, limit: int = 0) -> str:
    """A token's text with whitespace and control characters made visible.

    ``\\n``, ``\\t``, ``\\r`` become those two-character escapes, a space becomes ``·``, other
    control characters ``\\xNN``; an empty token is ``''``. With ``limit``, longer texts are cut
    to ``limit`` characters ending in ``…``.
    """
    if text == "":
        return "''"
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == " ":
            out.append("·")
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    s = "".join(out)
    return s if not limit or len(s) <= limit else s[: limit - 1] + "…"


def read_lines(path: str | Path, lines: str | None) -> tuple[str, int]:
    """The text of a file, or of its lines ``A-B`` (1-based, inclusive, with their line ends).

    Returns:
        The text and the number of its first line.

    Raises:
        PlotError: unreadable file, not UTF-8, or a malformed / out-of-range ``lines``.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PlotError(f"{path} is not UTF-8 text") from None
    text = text.removeprefix("\ufeff")  # as the corpus reader does
    if lines is None:
        return text, 1
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", lines)
    if not m:
        raise PlotError(f"--lines {lines!r}: expected A-B (e.g. 10-25) or a single line number")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    all_lines = text.splitlines(keepends=True)
    if not 1 <= first <= last or first > len(all_lines):
        raise PlotError(
            f"--lines {lines}: {path} has {len(all_lines)} lines; "
            f"choose 1 <= A <= B <= {len(all_lines)}"
        )
    return "".join(all_lines[first - 1 : last]), first


def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """For a byte-level BPE tokenizer, its printable-character -> byte map (GPT-2's); else None."""
    import json as _json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = _json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    if "ByteLevel" not in kinds:
        return None
    # GPT-2's bytes_to_unicode table, which ByteLevel uses: printable bytes stand for
    # themselves, the others for 256, 257, ... in byte order.
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(keep)
    order = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            order.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(order, chars, strict=True)}


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each id as text. A token that is not whole UTF-8 on its own (a piece of a multi-byte
    character) shows its bytes as ``\\xNN``; ids beyond the tokenizer (padded unembedding rows)
    show as ``<idN>``."""
    n = len(tokenizer)
    byte_map = _byte_decoder(tokenizer)
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < n:
            out.append(f"<id{i}>")
            continue
        text = tokenizer.decode([i])
        if "\ufffd" in text:
            raw = tokenizer.convert_ids_to_tokens(i)
            if byte_map is not None and all(c in byte_map for c in raw):
                text = bytes(byte_map[c] for c in raw).decode("utf-8", errors="backslashreplace")
            else:
                text = raw  # e.g. SentencePiece byte-fallback tokens: "<0xE2>"
        out.append(text)
    return out


GRID_LENS = LensSpec(layers="all", k=1, lookahead=[], entropy=True, kl_final=True)
"""What a grid shows: each layer's top-1, the target's log-prob and rank, KL to the final layer
and the entropy."""


def compute_grid(
    loaded: LoadedModel, text: str, *, add_bos: bool = True, first_line: int = 1
) -> LensGrid:
    """Run the lens over ``text`` at every layer.

    Args:
        loaded: a model from ``load_model`` (self-checked).
        text: the text; tokenized as a corpus document (no special tokens).
        add_bos: prepend the BOS (or EOS when there is none) as a job with ``tokens.add_bos`` does.
        first_line: the source line of the text's first character (for labels).

    Returns:
        The grid's statistics.

    Raises:
        PlotError: the text has no tokens, or more than ``MAX_TOKENS``.
    """
    tokenizer = loaded.tokenizer
    ids = backend_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids
    if not ids:
        raise PlotError("the text has no tokens; give some code with --text or --file")
    if len(ids) > MAX_TOKENS:
        raise PlotError(
            f"the text has {len(ids)} tokens; a grid shows at most {MAX_TOKENS} (choose fewer "
            "lines with --lines A-B)"
        )
    bos = None
    if add_bos:
        bos = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
    lens = resolve_lens(GRID_LENS, loaded)
    batch = LensPipeline(loaded, lens)([TextInput.of(ids, (), bos)])
    stats = batch.stats
    top1 = stats.topk_ids[..., 0].numpy()
    return LensGrid(
        layers=list(lens.captured),
        token_ids=list(ids),
        top1_ids=top1,
        top1_logprob=stats.topk_logprobs[..., 0].numpy(),
        logprob=stats.target_logprob.numpy(),
        rank=stats.target_rank.numpy(),
        kl=stats.kl_final.numpy(),
        entropy=stats.entropy.numpy(),
        token_text=token_texts(tokenizer, ids),
        top1_text=[token_texts(tokenizer, row) for row in top1.tolist()],
        first_line=first_line,
    )


def _norm(grid: LensGrid, metric: str):
    from matplotlib.colors import LogNorm, Normalize

    values = grid.values(metric)
    finite = values[np.isfinite(values)]
    if metric == "rank":
        hi = max(2.0, float(finite.max()) + 1 if finite.size else 2.0)
        return LogNorm(vmin=1, vmax=hi), values + 1  # rank + 1 so that top-1 fits a log scale
    if metric == "logprob":
        lo = float(np.percentile(finite, 2)) if finite.size else -10.0
        return Normalize(vmin=min(lo, -1e-3), vmax=0.0), values
    hi = float(np.percentile(finite, 98)) if finite.size else 1.0
    return Normalize(vmin=0.0, vmax=max(hi, 1e-3)), values


def _layer_label(layer: int, last: int) -> str:
    if layer == 0:
        return "0 emb"
    return f"{layer} out" if layer == last else str(layer)


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def render_png(grid: LensGrid, metric: str, path: str | Path, *, title: str = "") -> Path:
    """Draw the grid as a PNG (wide figure, small font; readable at 40+ tokens)."""
    path = Path(path)
    grid_figure(grid, metric, title=title).savefig(path, dpi=110, format="png")
    return path


def grid_figure(grid: LensGrid, metric: str, *, title: str = ""):
    """The grid as a matplotlib ``Figure`` (what ``render_png`` saves; a notebook displays it).

    Rows are layers (the embeddings at the bottom), columns positions; each cell shows the layer's
    top-1 next-token guess, coloured by ``metric`` (one of :data:`METRICS`), bold where it is the
    true next token.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    m = METRICS[metric]
    norm, shown = _norm(grid, metric)
    n_layers, n_tok = shown.shape
    cmap = colormaps[m.cmap].with_extremes(bad="#d9d9d9")  # no next token: grey
    width = min(max(8.0, 0.62 * n_tok + 2.5), 320.0)
    height = max(3.5, 0.34 * n_layers + 2.6)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    masked = np.ma.masked_invalid(shown)
    image = ax.imshow(
        masked, cmap=cmap, norm=norm, aspect="auto", origin="lower", interpolation="nearest"
    )
    targets = grid.target_ids
    fontsize = 7 if n_tok <= 80 else 6
    for li in range(n_layers):
        for j in range(n_tok):
            v = masked[li, j]
            rgba = cmap(norm(v)) if v is not np.ma.masked else (0.85, 0.85, 0.85, 1)
            hit = grid.top1_ids[li, j] == targets[j]
            ax.text(
                j,
                li,
                visible(grid.top1_text[li][j], 8),
                ha="center",
                va="center",
                fontsize=fontsize,
                color=_text_color(rgba),
                fontweight="bold" if hit else "normal",
                family="DejaVu Sans Mono",
            )
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([_layer_label(layer, grid.layers[-1]) for layer in grid.layers], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_tok))
    ax.set_xticklabels(
        [visible(t, 10) for t in grid.token_text],
        rotation=90,
        fontsize=fontsize,
        family="DejaVu Sans Mono",
    )
    ax.set_xlabel("input token at each position", loc="left")
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(n_tok))
    top.set_xticklabels(
        [visible(t, 10) for t in grid.token_text[1:]] + ["(end)"],
        rotation=90,
        fontsize=fontsize,
        family="DejaVu Sans Mono",
    )
    top.set_xlabel("true next token (bold cell: the layer's top-1 is this token)", loc="left")
    fig.colorbar(image, ax=ax, label=m.label, shrink=0.9, pad=0.01)
    # Left-aligned: a 100-token figure is metres wide, and a centred title would be off-screen.
    fig.suptitle(
        title or f"Logit lens: each layer's top-1 next-token guess, coloured by {m.label}",
        fontsize=11,
        x=0.005,
        ha="left",
    )
    return fig


def _hex(rgba) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in rgba[:3]))


def render_html(grid: LensGrid, metric: str, path: str | Path, *, title: str = "") -> Path:
    """Write the grid as one HTML table with inline colours; each cell carries its numbers.

    Every ``<td class="cell">`` has ``data-layer``, ``data-pos``, ``data-top1-id`` and
    ``data-value`` (the metric, ``nan`` where undefined) attributes and a tooltip with all the
    cell's statistics, so the page can be read by people and checked by scripts.
    """
    from matplotlib import colormaps

    m = METRICS[metric]
    norm, shown = _norm(grid, metric)
    cmap = colormaps[m.cmap]
    values = grid.values(metric)
    targets = grid.target_ids
    rows = []
    target_texts = [visible(t) for t in grid.token_text[1:]] + ["(end)"]
    head = "".join(
        f'<th class="tok" title="position {j}">{html.escape(visible(t, 12))}</th>'
        for j, t in enumerate(grid.token_text[1:] + ["(end)"])
    )
    rows.append(f'<tr><th class="lab">true next token →</th>{head}</tr>')
    for li in range(len(grid.layers) - 1, -1, -1):
        layer = grid.layers[li]
        cells = []
        for j in range(len(grid.token_ids)):
            v = values[li, j]
            if math.isfinite(v):
                rgba = cmap(norm(shown[li, j]))
                style = f"background:{_hex(rgba)};color:{_text_color(rgba)}"
            else:
                style = "background:#d9d9d9;color:black"
            hit = int(grid.top1_ids[li, j]) == targets[j]
            tip = (
                f"layer {layer}, position {j}\ntop-1: {visible(grid.top1_text[li][j])!s} "
                f"(p = {math.exp(float(grid.top1_logprob[li, j])):.3f})\n"
                f"true next: {target_texts[j]}\n"
                f"log-prob {grid.logprob[li, j]:.3f} · rank {grid.rank[li, j]} · "
                f"KL {grid.kl[li, j]:.3f} · entropy {grid.entropy[li, j]:.3f}"
            )
            cells.append(
                f'<td class="cell{" hit" if hit else ""}" style="{style}" data-layer="{layer}" '
                f'data-pos="{j}" data-top1-id="{int(grid.top1_ids[li, j])}" '
                f'data-value="{float(v)!r}" '
                f'title="{html.escape(tip)}">{html.escape(visible(grid.top1_text[li][j], 12))}</td>'
            )
        label = _layer_label(layer, grid.layers[-1])
        rows.append(f'<tr><th class="lab">layer {html.escape(label)}</th>{"".join(cells)}</tr>')
    inputs = "".join(f'<th class="tok">{html.escape(visible(t, 12))}</th>' for t in grid.token_text)
    rows.append(f'<tr><th class="lab">input token →</th>{inputs}</tr>')
    stops = ", ".join(_hex(cmap(x)) for x in np.linspace(0, 1, 9))
    lo, hi = norm.vmin, norm.vmax
    if metric == "rank":
        lo, hi = lo - 1, hi - 1
    heading = title or f"Logit lens: each layer's top-1 next-token guess, coloured by {m.label}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<style>
body {{ font-family: "DejaVu Sans", sans-serif; margin: 16px; color: #1d2430; }}
h1 {{ font-size: 18px; }}
p {{ max-width: 1000px; line-height: 1.4; }}
.wrap {{ overflow-x: auto; }}
table.grid {{ border-collapse: collapse; font-family: "DejaVu Sans Mono", monospace;
  font-size: 11px; }}
table.grid td, table.grid th {{ border: 1px solid #fff; padding: 2px 4px; white-space: pre;
  text-align: center; min-width: 3.2em; }}
table.grid th.lab {{ text-align: right; background: #f3f4f6; position: sticky; left: 0; }}
table.grid th.tok {{ background: #f3f4f6; font-weight: normal; }}
table.grid td.hit {{ font-weight: bold; text-decoration: underline; }}
.legend {{ display: flex; align-items: center; gap: 8px; margin: 10px 0; font-size: 13px; }}
.bar {{ width: 320px; height: 14px; background: linear-gradient(to right, {stops}); }}
</style></head><body>
<h1>{html.escape(heading)}</h1>
<p>Rows are layers (output at the top, embeddings at the bottom), columns are positions in the
text (lines from {grid.first_line}). Each cell shows the token that layer ranks first as the
<em>next</em> token; its colour is the {html.escape(m.label)}. Bold underlined cells: the layer's
top-1 is the true next token. Hover a cell for all its numbers. Whitespace is shown as · (space),
\\n (newline) and \\t (tab).</p>
<div class="legend"><span>{html.escape(m.label)}:</span><span>{lo:.3g}</span>
<span class="bar"></span><span>{hi:.3g}</span><span>(grey: no next token)</span></div>
<div class="wrap"><table class="grid">{"".join(rows)}</table></div>
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
