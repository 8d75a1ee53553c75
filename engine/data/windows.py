"""Tokenization, overlapping windows and shard planning.

A document of ``n`` tokens ``x[0..n-1]`` is cut into windows of at most ``window`` input ids. Each
window *emits* (produces output rows for) a run of new positions; every position is emitted by
exactly one window. After the first window, a window also carries the ``overlap`` tokens before
its first emitted position as context, so predictions near the start of a window still see what
came before. With a BOS id, every window starts with it, since models expect it::

    window=8, overlap=2, BOS, n=15:       (emitted tokens in brackets)
      w0: BOS [x0 x1 x2 x3 x4 x5 x6]      first_pos=0,  n_emit=7
      w1: BOS  x5 x6 [x7 x8 x9 x10 x11]   first_pos=7,  n_emit=5
      w2: BOS  x10 x11 [x12 x13 x14]      first_pos=12, n_emit=3

``pos`` is the document's own position: the BOS is context, never a row. Targets come from the
whole document (:func:`target_columns`), so the target of a window's last token is the next document
token even when it lies in the next window; only the document's last token has none (-1).

Shards group consecutive windows until they emit ``shard_tokens`` tokens. Planning is a pure
function of the window sequence, so the same corpus, tokenizer and spec always give the same
shards, and a rerun can skip the ones already committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from codelens.engine.data.repeats import CopyFeatures
from codelens.engine.data.syntax import TokenSpans

__all__ = [
    "Shard",
    "Window",
    "WindowTask",
    "make_windows",
    "plan_shards",
    "target_columns",
]


@dataclass(frozen=True, slots=True)
class Window:
    """One model input and the document positions it emits.

    Attributes:
        doc: the document index (:attr:`Document.doc`).
        input_ids: what the model sees: ``[bos?] + carried context + new tokens``, at most
            ``window`` ids.
        first_pos: document position of the first emitted token.
        n_emit: number of emitted tokens: the last ``n_emit`` ids of ``input_ids`` are document
            positions ``first_pos .. first_pos + n_emit - 1``.
    """

    doc: int
    input_ids: list[int]
    first_pos: int
    n_emit: int

    @property
    def emit_start(self) -> int:
        """Index in ``input_ids`` of the first emitted token."""
        return len(self.input_ids) - self.n_emit


@dataclass(frozen=True)
class WindowTask:
    """One model input and the document coordinates of the rows it emits.

    Attributes:
        doc: document index.
        input_ids: what the model sees (BOS, carried context, new tokens).
        first_pos: document position of the first emitted token.
        targets: ``[n_emit, 1 + A]`` int32: next token, then the look-ahead tokens; -1 past the end.
        language: the document's language (``Document.language``), or None.
        spans: byte spans, lines and syntax categories of the emitted tokens (planned with the
            window); None leaves the ``line``/``byte_*``/``category`` columns null.
    """

    doc: int
    input_ids: tuple[int, ...]
    first_pos: int
    targets: np.ndarray
    language: str | None = None
    spans: TokenSpans | None = None
    copy: CopyFeatures | None = None

    @property
    def n_emit(self) -> int:
        """Number of rows (tokens) this window emits: the last ``n_emit`` input ids."""
        return self.targets.shape[0]


@dataclass(frozen=True, slots=True)
class Shard:
    """A unit of work committed on its own: consecutive windows in document order.

    Attributes:
        index: 0-based shard number, deterministic for the same corpus, tokenizer and spec.
        windows: the windows, in document order (a long document may continue in the next shard).
        n_tokens: emitted tokens in the shard (one output row per token and layer).
    """

    index: int
    windows: tuple[WindowTask, ...]
    n_tokens: int


def _check_window(window: int, overlap: int, bos_id: int | None) -> int:
    """Validate the window settings; return the document tokens per window."""
    n_bos = 0 if bos_id is None else 1
    if window < 2 + n_bos:
        raise ValueError(
            f"tokens.window must be >= {2 + n_bos} "
            f"({'with a BOS: 1 BOS + ' if n_bos else ''}at least 2 document tokens), got {window}"
        )
    capacity = window - n_bos
    if not 0 <= overlap < capacity:
        raise ValueError(
            f"tokens.overlap must be in 0..{capacity - 1} (less than the window's {capacity} "
            f"document tokens, so each window emits at least one new token), got {overlap}"
        )
    return capacity


def make_windows(
    doc: int, ids: Sequence[int], *, window: int, overlap: int, bos_id: int | None
) -> list[Window]:
    """Cut one document into windows that emit each position exactly once.

    Args:
        doc: the document index.
        ids: the document's own tokens (no BOS).
        window: the most input ids per window, BOS included.
        overlap: tokens of preceding context carried into every window after the first.
        bos_id: the id prepended to every window, or None for none.

    Returns:
        The windows in position order; empty for an empty document.

    Raises:
        ValueError: ``window < 2`` (``< 3`` with a BOS) or ``overlap`` not in
            ``0 .. window - 1 - (1 if BOS)``.
    """
    capacity = _check_window(window, overlap, bos_id)
    ids = ids if isinstance(ids, list) else list(ids)
    prefix = [] if bos_id is None else [bos_id]
    n = len(ids)
    if n == 0:
        return []
    first = min(capacity, n)
    windows = [Window(doc, prefix + ids[:first], 0, first)]
    # Later windows spend `overlap` slots on context, so each emits `step` new tokens.
    step = capacity - overlap
    for start in range(first, n, step):
        stop = min(start + step, n)
        windows.append(Window(doc, prefix + ids[start - overlap : stop], start, stop - start))
    return windows


def plan_shards(windows: Iterable[Window], shard_tokens: int) -> Iterator[Shard]:
    """Group consecutive windows into shards of about ``shard_tokens`` emitted tokens.

    A shard closes as soon as its emitted tokens reach ``shard_tokens``, so it exceeds that by
    less than one window; only the last shard may be smaller. The plan depends on nothing but the
    window sequence, so it is identical on every rerun.

    Args:
        windows: windows in corpus order (e.g. from :func:`make_windows`).
        shard_tokens: target emitted tokens per shard (``output.shard_tokens``).

    Returns:
        An iterator over shards numbered from 0.

    Raises:
        ValueError: ``shard_tokens < 1`` (at call time).
    """
    if shard_tokens < 1:
        raise ValueError(f"output.shard_tokens must be >= 1, got {shard_tokens}")
    return _plan_shards(windows, shard_tokens)


def _plan_shards(windows: Iterable[Window], shard_tokens: int) -> Iterator[Shard]:
    """The lazy part of :func:`plan_shards`."""
    index = 0
    group: list[Window] = []
    n_tokens = 0
    for win in windows:
        group.append(win)
        n_tokens += win.n_emit
        if n_tokens >= shard_tokens:
            yield Shard(index, tuple(group), n_tokens)
            index += 1
            group = []
            n_tokens = 0
    if group:
        yield Shard(index, tuple(group), n_tokens)


def target_columns(
    ids: Sequence[int], first_pos: int, n_emit: int, offsets: Sequence[int]
) -> list[list[int]]:
    """Next-token and look-ahead targets, column-major: one list per offset.

    ``1 + len(offsets)`` lists of ``n_emit`` ids rather than ``n_emit`` small lists: that
    allocates a handful of objects per window, where many small lists wake the garbage collector,
    which then walks every live token list (10x slower with ~10M ids in memory).

    Args:
        ids: the document's own tokens.
        first_pos: the first emitted position.
        n_emit: the number of emitted positions.
        offsets: look-ahead offsets (``lens.lookahead``), each >= 1.

    Returns:
        ``columns[0][j] = x[first_pos + j + 1]`` and ``columns[a + 1][j] = x[first_pos + j +
        offsets[a]]``, with -1 wherever the position lies beyond the document's end.

    Raises:
        ValueError: an offset < 1, or emitted positions outside the document.
    """
    bad = [o for o in offsets if o < 1]
    if bad:
        raise ValueError(f"look-ahead offsets must be >= 1, got {bad}")
    if first_pos < 0 or n_emit < 0 or first_pos + n_emit > len(ids):
        raise ValueError(
            f"positions {first_pos}..{first_pos + n_emit - 1} are outside a document of "
            f"{len(ids)} tokens"
        )
    columns = []
    for offset in (1, *offsets):
        # C-level slicing; only the tail of the document's last window needs padding.
        column = list(ids[first_pos + offset : first_pos + offset + n_emit])
        column.extend([-1] * (n_emit - len(column)))
        columns.append(column)
    return columns
