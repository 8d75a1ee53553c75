"""Examples for the report: tokens picked from a run's rows by rule, each shown as a lens grid.

The seeds ask about single tokens as much as about means: a rare identifier the model copies from
earlier in the file, a layer that passes through another language's tokens, a layer that already
knows the token after next. For each rule the report shows the per-prompt grid (the
``codelens plot`` figure: layers by positions, each cell the layer's top-1 for the next token)
around the picked token, built from the run's own rows, so a cell is exactly that row.

Rules (each over the tokens of the first ``MAX_EXAMPLE_ROWS`` rows of the run, in part order):

``copy``
    the target is a *rare* identifier (``target_freq_bucket <= RARE_BUCKET``: at most 3
    occurrences in the corpus) that was *seen* earlier in the document (``target_seen``), the final
    layer predicts it (top-1), and among those the ones that converge latest (the first layer
    from which the final top-1 stays top-1). The first ``N_COPY_EXAMPLES`` of them.
``detour``
    the largest mass a layer between the embeddings and the output puts on a token set named
    after another language than the document's (a set named like the document's language, or
    any set when the document has no language), minus that set's mass at the output.
``lookahead``
    the largest gain in log-prob of the token ``o`` positions ahead (``lens.lookahead``) at an
    intermediate layer over the output layer's log-prob of it.

Ties go to the earlier token (document, then position), so the picks are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from codelens.engine.analysis.grid import LensGrid, token_texts

__all__ = ["Example", "pick_examples"]

MAX_EXAMPLE_ROWS = 4_000_000
"""Examples are picked among the tokens of the first part files up to this many rows, so a
report stays a few seconds on any corpus."""
RARE_BUCKET = 1
"""A target is rare when its corpus count is below ``2^(RARE_BUCKET + 1)`` (at most 3)."""
N_COPY_EXAMPLES = 2
CONTEXT_BEFORE = 18
CONTEXT_AFTER = 5
_COLUMNS = frozenset(
    {
        "doc",
        "pos",
        "layer",
        "site",
        "line",
        "category",
        "token_id",
        "target_id",
        "target_seen",
        "target_freq_bucket",
        "topk_ids",
        "topk_logprobs",
        "target_logprob",
        "target_rank",
        "kl_final",
        "entropy",
        "ahead_logprob",
        "residual_finite",
    }
)


@dataclass(frozen=True)
class Example:
    """One picked token and its grid.

    Attributes:
        rule: ``copy``, ``detour`` or ``lookahead``.
        title: what was picked, with its document and line.
        look_for: one sentence: what the figure shows.
        grid: layers x positions around the token (its column is ``column``).
        column: index of the picked position in the grid.
    """

    rule: str
    title: str
    look_for: str
    grid: LensGrid
    column: int


@dataclass(frozen=True)
class _Tokens:
    """Per-token arrays from the rows (block site), tokens sorted by (doc, pos)."""

    layers: list[int]
    doc: np.ndarray  # [T]
    pos: np.ndarray
    line: np.ndarray
    category: np.ndarray  # object [T]: the token's syntax category
    token_id: np.ndarray
    target_id: np.ndarray
    seen: np.ndarray  # int8: 1 / 0 / -1
    bucket: np.ndarray
    per_layer: dict[str, np.ndarray]  # name -> [n_layers, T] (or [n_layers, T, A])

    def next_token_category(self) -> np.ndarray:
        """``[T]`` the category of the token at ``pos + 1`` (None where it is not here)."""
        out = np.full(self.doc.shape[0], None, dtype=object)
        follows = (self.doc[1:] == self.doc[:-1]) & (self.pos[1:] == self.pos[:-1] + 1)
        out[:-1][follows] = self.category[1:][follows]
        return out


def _read_tokens(run_dir: Path, layers: list[int]) -> _Tokens | None:
    """The block rows of the first part files (up to ``MAX_EXAMPLE_ROWS``), per token."""
    parts = sorted((run_dir / "lens").glob("part-*.parquet"))
    tables, n_rows = [], 0
    for part in parts:
        names = pq.read_schema(part).names
        wanted = [n for n in names if n in _COLUMNS or n.startswith("set_")]
        t = pq.read_table(part, columns=wanted)
        tables.append(t.filter(pc.equal(t.column("site"), "block")))
        n_rows += t.num_rows
        if n_rows >= MAX_EXAMPLE_ROWS:
            break
    if not tables:
        return None
    table = pa.concat_tables(tables)
    layer = table.column("layer").to_numpy()
    table = table.filter(pa.array(np.isin(layer, layers)))
    layer = layer[np.isin(layer, layers)]
    # Only tokens with a row at every reported layer (a shard's rows are one part file, so this
    # holds for every token read; checked all the same, since the reshape below relies on it).
    doc = table.column("doc").to_numpy().astype(np.int64)
    pos = table.column("pos").to_numpy().astype(np.int64)
    key = doc * (1 << 32) + pos
    keys, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    keep = counts[inverse] == len(layers)
    table = table.filter(pa.array(keep))
    layer, key = layer[keep], key[keep]
    order = np.lexsort((key, layer))  # layer-major, tokens by (doc, pos) within a layer
    table = table.take(pa.array(order))
    n_layers = len(layers)
    n_tok = table.num_rows // n_layers
    if n_tok == 0:
        return None

    def column(name: str) -> np.ndarray:
        c = table.column(name)
        if pa.types.is_fixed_size_list(c.type):
            values = c.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            return values.reshape(n_layers, n_tok, c.type.list_size)
        return c.to_numpy(zero_copy_only=False).reshape(n_layers, n_tok)

    def first_layer(name: str) -> np.ndarray:
        return column(name)[0]

    def flag(name: str) -> np.ndarray:
        values = table.column(name).slice(0, n_tok).to_pylist()
        return np.array([-1 if v is None else int(v) for v in values], np.int8)

    per_layer = {
        "finite": column("residual_finite").astype(bool),
        "top1": column("topk_ids")[..., 0],
        "top1_logprob": column("topk_logprobs")[..., 0],
        "logprob": column("target_logprob"),
        "rank": column("target_rank"),
    }
    for optional in ("kl_final", "entropy", "ahead_logprob"):
        if optional in table.column_names:
            per_layer[optional] = column(optional)
    for name in table.column_names:
        if name.startswith("set_"):
            per_layer[name] = column(name)
    line = table.column("line").slice(0, n_tok).to_pylist()
    return _Tokens(
        layers=layers,
        doc=first_layer("doc").astype(np.int64),
        pos=first_layer("pos").astype(np.int64),
        line=np.array([-1 if v is None else v for v in line], np.int64),
        category=np.array(table.column("category").slice(0, n_tok).to_pylist(), dtype=object),
        token_id=first_layer("token_id").astype(np.int64),
        target_id=first_layer("target_id").astype(np.int64),
        seen=flag("target_seen"),
        bucket=first_layer("target_freq_bucket").astype(np.int64),
        per_layer=per_layer,
    )


def _convergence(top1: np.ndarray, finite: np.ndarray, layers: list[int]) -> np.ndarray:
    """``[T]`` the first layer from which the final top-1 stays top-1 (``aggregates`` rule: a
    non-finite row disagrees)."""
    agree = (top1 == top1[-1]) & finite
    stays = np.logical_and.accumulate(agree[::-1], axis=0)[::-1]
    return np.asarray(layers)[stays.argmax(axis=0)]


def _grid(tokens: _Tokens, i: int, tokenizer: Any) -> tuple[LensGrid, int]:
    """The grid of the positions around token ``i`` that are in ``tokens`` (same document)."""
    same = np.flatnonzero(tokens.doc == tokens.doc[i])
    lo = max(int(same[0]), i - CONTEXT_BEFORE)
    hi = min(int(same[-1]) + 1, i + CONTEXT_AFTER + 1)
    # Keep a contiguous run of positions (a gap means rows not read).
    while lo < i and tokens.pos[i] - tokens.pos[lo] != i - lo:
        lo += 1
    while hi > i + 1 and tokens.pos[hi - 1] - tokens.pos[i] != hi - 1 - i:
        hi -= 1
    sl = slice(lo, hi)
    n_layers = len(tokens.layers)

    def get(name: str) -> np.ndarray:
        if name in tokens.per_layer:
            return tokens.per_layer[name][:, sl].astype(np.float64)
        return np.full((n_layers, hi - lo), np.nan)

    top1 = tokens.per_layer["top1"][:, sl]
    ids = tokens.token_id[sl].tolist()
    grid = LensGrid(
        layers=list(tokens.layers),
        token_ids=ids,
        top1_ids=top1,
        top1_logprob=get("top1_logprob"),
        logprob=get("logprob"),
        rank=tokens.per_layer["rank"][:, sl],
        kl=get("kl_final"),
        entropy=get("entropy"),
        token_text=token_texts(tokenizer, ids),
        top1_text=[token_texts(tokenizer, row) for row in top1.tolist()],
        first_line=max(1, int(tokens.line[lo])),
    )
    return grid, i - lo


def _where(docs: dict[int, dict[str, Any]], tokens: _Tokens, i: int) -> str:
    source = Path(str(docs.get(int(tokens.doc[i]), {}).get("source", f"doc {tokens.doc[i]}")))
    return f"{source.name}, line {tokens.line[i]}"


def _text(tokenizer: Any, token_id: int) -> str:
    return repr(token_texts(tokenizer, [int(token_id)])[0])


def _copy_examples(tokens: _Tokens, docs, tokenizer) -> list[Example]:
    finite = tokens.per_layer["finite"]
    conv = _convergence(tokens.per_layer["top1"], finite, tokens.layers)
    final_right = (tokens.per_layer["top1"][-1] == tokens.target_id) & finite[-1]
    rare_seen = (tokens.seen == 1) & (tokens.bucket >= 0) & (tokens.bucket <= RARE_BUCKET)
    is_name = tokens.next_token_category() == "name"
    candidates = np.flatnonzero(rare_seen & is_name & final_right)
    if candidates.size == 0:
        return []
    # Latest convergence first; ties to the earlier token (stable sort on the token order).
    picked = candidates[np.argsort(-conv[candidates], kind="stable")][:N_COPY_EXAMPLES]
    out = []
    for i in picked.tolist():
        grid, column = _grid(tokens, i, tokenizer)
        target = _text(tokenizer, tokens.target_id[i])
        out.append(
            Example(
                "copy",
                f"Copying a rare identifier: {target} ({_where(docs, tokens, i)})",
                f"In column {column + 1} the next token is {target}, which occurs at most 3 "
                "times in the corpus and already appeared earlier in this file: read the column "
                f"upwards to see that only from layer {conv[i]} on does the lens predict it.",
                grid,
                column,
            )
        )
    return out


def _detour_example(tokens: _Tokens, docs, tokenizer) -> list[Example]:
    sets = [name for name in tokens.per_layer if name.startswith("set_")]
    if not sets or len(tokens.layers) < 3:
        return []
    language = np.array(
        [str(docs.get(int(d), {}).get("language") or "") for d in tokens.doc], dtype=object
    )
    best = (-np.inf, -1, "")
    for name in sets:
        mass = np.exp(tokens.per_layer[name].astype(np.float64))  # [n_layers, T]
        gain = np.nan_to_num(mass[1:-1].max(axis=0) - mass[-1], nan=-np.inf)
        gain[language == name[len("set_") :]] = -np.inf  # the document's own language
        i = int(np.argmax(gain))
        if gain[i] > best[0]:
            best = (float(gain[i]), i, name[len("set_") :])
    gain, i, set_name = best
    if i < 0 or not np.isfinite(gain) or gain <= 0:
        return []
    mass = np.exp(tokens.per_layer["set_" + set_name][:, i].astype(np.float64))
    peak = tokens.layers[1 + int(np.argmax(mass[1:-1]))]
    grid, column = _grid(tokens, i, tokenizer)
    return [
        Example(
            "detour",
            f"A detour through the {set_name!r} set ({_where(docs, tokens, i)})",
            f"In column {column + 1}, layer {peak} puts {mass[1:-1].max():.0%} of its "
            f"probability on the {set_name!r} token set and the output only {mass[-1]:.1%}: "
            "look for that set's tokens among the middle layers' top-1 there.",
            grid,
            column,
        )
    ]


def _lookahead_example(tokens: _Tokens, docs, tokenizer, offsets: list[int]) -> list[Example]:
    ahead = tokens.per_layer.get("ahead_logprob")
    if ahead is None or not offsets or len(tokens.layers) < 3:
        return []
    gain = ahead[1:-1].max(axis=0) - ahead[-1]  # [T, A]
    gain = np.nan_to_num(gain.astype(np.float64), nan=-np.inf)
    flat = int(np.argmax(gain.T.reshape(-1)))  # offset-major: ties to the smaller offset
    a, i = divmod(flat, gain.shape[0])
    if not np.isfinite(gain[i, a]) or gain[i, a] <= 0:
        return []
    layer_lp = ahead[1:-1, i, a]
    peak = tokens.layers[1 + int(np.argmax(layer_lp))]
    grid, column = _grid(tokens, i, tokenizer)
    return [
        Example(
            "lookahead",
            f"Seeing {offsets[a]} tokens ahead ({_where(docs, tokens, i)})",
            f"At column {column + 1}, layer {peak} gives the token {offsets[a]} positions ahead a "
            f"log-prob of {layer_lp.max():.2f} where the output gives {ahead[-1, i, a]:.2f}: the "
            "middle layers hold more than the next token there.",
            grid,
            column,
        )
    ]


def pick_examples(
    run_dir: Path, summary: dict[str, Any], docs: dict[int, dict[str, Any]], tokenizer: Any
) -> list[Example]:
    """The report's examples (module docstring), in rule order; rules with no candidate are
    left out.

    Args:
        run_dir: the finished run.
        summary: its ``summary.json``.
        docs: ``docs.parquet`` rows by document index.
        tokenizer: the model's tokenizer (for the tokens' text).
    """
    layers = [r["layer"] for r in summary["layers"]]
    if summary.get("n_blocks") is not None and layers[-1] != summary["n_blocks"]:
        return []  # the rules compare layers with the output, which this run did not write
    tokens = _read_tokens(Path(run_dir), layers)
    if tokens is None:
        return []
    offsets = [a["offset"] for a in summary["layers"][0].get("lookahead", [])]
    return [
        *_copy_examples(tokens, docs, tokenizer),
        *_detour_example(tokens, docs, tokenizer),
        *_lookahead_example(tokens, docs, tokenizer, offsets),
    ]
