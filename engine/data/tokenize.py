"""One tokenizer pass over a corpus: each document's ids and, on request, its tokens' spans.

The ids are what ``tokenizer(doc.text, add_special_tokens=False)["input_ids"]`` gives: no BOS,
EOS or other added special token (windows add the BOS themselves). With ``spans=True`` the same
pass also returns each token's byte span, line and syntax category
(:func:`codelens.engine.data.syntax.token_spans`, from the tokenizer's character offsets); without
it the offsets are not computed and the lexer never runs (the planner's counting pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from codelens.engine.data.corpus import Document
from codelens.engine.data.syntax import TokenSpans, token_spans

__all__ = ["backend_tokenizer", "tokenize_documents"]

Tokenized = tuple[Document, "list[int] | None", "TokenSpans | None"]
"""``(document, ids, spans)``: ids and spans are None for a skipped document, spans also when
they were not asked for."""


def backend_tokenizer(tokenizer: Any) -> Any:
    """A private Rust tokenizer that encodes as ``tokenizer(text, add_special_tokens=False)`` does.

    Going to the Rust backend directly skips transformers' per-document Python bookkeeping. It is
    a copy because the copy must have truncation and padding switched off (a ``tokenizer.json``
    may enable them, and transformers switches them off on each call by mutating the shared
    backend), and mutating the caller's tokenizer would be a side effect.

    Raises:
        TypeError: the tokenizer is not a fast one (no ``tokenizer.json``).
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
    docs: Iterable[Document], tokenizer: Any, *, spans: bool = False, batch_size: int = 64
) -> Iterator[Tokenized]:
    """Tokenize documents in batches, lazily, keeping corpus order.

    Args:
        docs: documents in corpus order; skipped ones (``status != "ok"``) pass through.
        tokenizer: a fast tokenizer: a transformers tokenizer backed by ``tokenizers`` or a
            ``tokenizers.Tokenizer``. It is not modified.
        spans: also compute each token's :class:`TokenSpans` (offsets, lines, syntax categories).
        batch_size: documents per call into the Rust tokenizer, which encodes a batch in parallel.

    Returns:
        An iterator over ``(document, ids, spans)`` in the order of ``docs``.

    Raises:
        TypeError: the tokenizer is not a fast one (at call time).
        ValueError: ``batch_size < 1`` (at call time).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Checked and copied at call time, so a wrong tokenizer fails before any document is read.
    backend = backend_tokenizer(tokenizer)
    return _tokenize(docs, backend, spans, batch_size)


def _has_text(document: Document) -> bool:
    """Whether a document is tokenized: skipped ones pass through with ids None."""
    return document.ok and document.text is not None


def _tokenize(
    docs: Iterable[Document], backend: Any, with_spans: bool, batch_size: int
) -> Iterator[Tokenized]:
    """The lazy part of :func:`tokenize_documents`."""
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, needed only for spans.
    encode = (
        backend.encode_batch
        if with_spans
        else getattr(backend, "encode_batch_fast", backend.encode_batch)
    )
    pending: list[Document] = []
    texts: list[str] = []

    def flush() -> Iterator[Tokenized]:
        encodings = iter(encode(texts, add_special_tokens=False)) if texts else iter(())
        for document in pending:
            if not _has_text(document):
                yield document, None, None
                continue
            enc = next(encodings)
            assert document.text is not None
            spans = (
                token_spans(document.text, enc.offsets, document.language) if with_spans else None
            )
            yield document, enc.ids, spans
        pending.clear()
        texts.clear()

    for document in docs:
        pending.append(document)
        if _has_text(document):
            assert document.text is not None
            texts.append(document.text)
            if len(texts) >= batch_size:
                yield from flush()
    yield from flush()
