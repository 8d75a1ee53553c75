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
whole document (:func:`targets_for`), so the target of a window's last token is the next document
token even when it lies in the next window; only the document's last token has none (-1).

Shards group consecutive windows until they emit ``shard_tokens`` tokens. Planning is a pure
function of the window sequence, so the same corpus, tokenizer and spec always give the same
shards, and a rerun can skip the ones already committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from codelens.engine.corpus import Document

__all__ = [
    "Shard",
    "TokenizedDoc",
    "Window",
    "iter_windows",
    "make_windows",
    "plan_shards",
    "target_columns",
    "targets_for",
    "tokenize_documents",
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


@dataclass(frozen=True, slots=True)
class TokenizedDoc:
    """A document's own tokens.

    Attributes:
        doc: the document index (:attr:`Document.doc`).
        ids: token ids without any BOS or other special token; position ``i`` is ``ids[i]``.
    """

    doc: int
    ids: list[int]


@dataclass(frozen=True, slots=True)
class Shard:
    """A unit of work committed on its own: consecutive windows in document order.

    Attributes:
        index: 0-based shard number, deterministic for the same corpus, tokenizer and spec.
        windows: the windows, in document order (a long document may continue in the next shard).
        n_tokens: emitted tokens in the shard (one output row per token and layer).
    """

    index: int
    windows: tuple[Window, ...]
    n_tokens: int


def _backend_tokenizer(tokenizer: Any) -> Any:
    """A private Rust tokenizer that encodes as ``tokenizer(text, add_special_tokens=False)`` does.

    Going to the Rust backend directly skips transformers' per-document Python bookkeeping and the
    offsets computation. It is a copy because the copy must have truncation and padding switched
    off (a ``tokenizer.json`` may enable them, and transformers switches them off on each call by
    mutating the shared backend), and mutating the caller's tokenizer would be a side effect.
    """
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        backend, split_special = tokenizer, tokenizer.encode_special_tokens
    elif getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer"):
        backend = tokenizer.backend_tokenizer
        split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    else:
        raise TypeError(
            f"tokenize_documents needs a fast tokenizer (tokenizers.Tokenizer or a transformers "
            f"tokenizer backed by one), got {type(tokenizer).__name__}. Fix: give the model "
            "directory a tokenizer.json."
        )
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    # A literal "<|endoftext|>" in a source file maps to the special token unless the tokenizer
    # says otherwise, exactly as tokenizer(text) would do.
    copy.encode_special_tokens = split_special
    return copy


def tokenize_documents(
    docs: Iterable[Document], tokenizer: Any, *, batch_size: int = 64
) -> Iterator[tuple[Document, list[int] | None]]:
    """Tokenize documents in batches, lazily, keeping corpus order.

    The ids are what ``tokenizer(doc.text, add_special_tokens=False)["input_ids"]`` gives: no BOS,
    EOS or other added special token (windows add the BOS themselves).

    Args:
        docs: documents in corpus order; skipped ones (``status != "ok"``) pass through.
        tokenizer: a fast tokenizer: a transformers tokenizer backed by ``tokenizers`` or a
            ``tokenizers.Tokenizer``. It is not modified.
        batch_size: documents per call into the Rust tokenizer, which encodes a batch in parallel.

    Returns:
        An iterator over ``(document, ids)`` in the order of ``docs``; ``ids`` is None for a
        skipped document.

    Raises:
        TypeError: the tokenizer is not a fast one (at call time).
        ValueError: ``batch_size < 1`` (at call time).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Checked and copied at call time, so a wrong tokenizer fails before any document is read.
    backend = _backend_tokenizer(tokenizer)
    return _tokenize(docs, backend, batch_size)


def _tokenize(
    docs: Iterable[Document], backend: Any, batch_size: int
) -> Iterator[tuple[Document, list[int] | None]]:
    """The lazy part of :func:`tokenize_documents`."""
    # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets we never use.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    pending: list[Document] = []
    texts: list[str] = []

    def flush() -> Iterator[tuple[Document, list[int] | None]]:
        encodings = iter(encode(texts, add_special_tokens=False)) if texts else iter(())
        for document in pending:
            yield document, (next(encodings).ids if _has_text(document) else None)
        pending.clear()
        texts.clear()

    for document in docs:
        pending.append(document)
        if _has_text(document) and document.text is not None:
            texts.append(document.text)
            if len(texts) >= batch_size:
                yield from flush()
    yield from flush()


def _has_text(document: Document) -> bool:
    """Whether a document is tokenized: skipped ones pass through with ids None."""
    return document.ok and document.text is not None


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


def iter_windows(
    tokenized: Iterable[tuple[Document, list[int] | None]],
    *,
    window: int,
    overlap: int,
    bos_id: int | None,
) -> Iterator[Window]:
    """Windows of every tokenized document, lazily, in corpus order.

    Args:
        tokenized: what :func:`tokenize_documents` yields; skipped documents yield no window.
        window: see :func:`make_windows`.
        overlap: see :func:`make_windows`.
        bos_id: see :func:`make_windows`.

    Returns:
        An iterator over windows in document order, then position order.

    Raises:
        ValueError: invalid ``window``/``overlap`` (at call time).
    """
    _check_window(window, overlap, bos_id)
    return _iter_windows(tokenized, window, overlap, bos_id)


def _iter_windows(
    tokenized: Iterable[tuple[Document, list[int] | None]],
    window: int,
    overlap: int,
    bos_id: int | None,
) -> Iterator[Window]:
    """The lazy part of :func:`iter_windows`."""
    for document, ids in tokenized:
        if ids:
            yield from make_windows(
                document.doc, ids, window=window, overlap=overlap, bos_id=bos_id
            )


def plan_shards(windows: Iterable[Window], shard_tokens: int) -> Iterator[Shard]:
    """Group consecutive windows into shards of about ``shard_tokens`` emitted tokens.

    A shard closes as soon as its emitted tokens reach ``shard_tokens``, so it exceeds that by
    less than one window; only the last shard may be smaller. The plan depends on nothing but the
    window sequence, so it is identical on every rerun.

    Args:
        windows: windows in corpus order (e.g. from :func:`iter_windows`).
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

    The same values as :func:`targets_for`, transposed: ``1 + len(offsets)`` lists of ``n_emit``
    ids instead of ``n_emit`` small lists. Prefer it on hot paths (``torch.tensor(columns).T``):
    it allocates a handful of objects per window, where many small lists wake the garbage
    collector, which then walks every live token list (10x slower with ~10M ids in memory).

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


def targets_for(
    ids: Sequence[int], first_pos: int, n_emit: int, offsets: Sequence[int]
) -> list[list[int]]:
    """Next-token and look-ahead targets of emitted positions, from the whole document.

    Targets come from the document, not the window, so the target of a window's last token is
    the next document token even when it lies in the next window.

    Args:
        ids: the document's own tokens.
        first_pos: the first emitted position.
        n_emit: the number of emitted positions.
        offsets: look-ahead offsets (``lens.lookahead``), each >= 1.

    Returns:
        One row per emitted position ``i``: ``[x[i+1]] + [x[i+o] for o in offsets]``, with -1
        wherever the position lies beyond the document's end.

    Raises:
        ValueError: an offset < 1, or emitted positions outside the document.
    """
    return [list(row) for row in zip(*target_columns(ids, first_pos, n_emit, offsets), strict=True)]
