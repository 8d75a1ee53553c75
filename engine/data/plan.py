"""From a job spec to shards: corpus -> tokens -> windows (with targets) -> shards.

Planning is deterministic (same corpus, tokenizer and spec give the same shards), which is what
lets a rerun skip committed shards. It is streamed: ``iter_shards`` yields one shard at a time and
keeps only that shard's windows in memory, so the corpus can be larger than memory.
``plan_corpus`` makes one counting pass first, for docs.parquet and for progress and ETA.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from codelens.engine.data.corpus import Document, read_corpus
from codelens.engine.data.repeats import CopyFeatures, TokenCounts
from codelens.engine.data.tokenize import tokenize_documents
from codelens.engine.data.windows import (
    Shard,
    WindowTask,
    make_windows,
    plan_shards,
    target_columns,
)
from codelens.engine.row_schema import DOCS_SCHEMA
from codelens.engine.schemas import JobSpec, TokensSpec


@dataclass(frozen=True)
class CorpusPlan:
    """The result of the counting pass.

    Attributes:
        docs: the docs.parquet table (doc, source, n_tokens, status, language).
        shard_tokens: emitted tokens of each shard, by shard index.
        token_counts: ``[max id + 1]`` occurrences of each token id over the ``ok`` documents
            (the ``target_freq_bucket`` column's counts).
    """

    docs: pa.Table
    shard_tokens: tuple[int, ...]
    token_counts: np.ndarray

    @property
    def n_tokens(self) -> int:
        """Tokens (rows per layer) of the whole job."""
        return sum(self.shard_tokens)


def bos_id(tokens: TokensSpec, tokenizer: Any) -> int | None:
    """The id every window starts with (``tokens.add_bos``), or None."""
    if not tokens.add_bos:
        return None
    bos = tokenizer.bos_token_id
    # Tokenizers without a BOS (GPT-2 style) conventionally use EOS as the document separator.
    return bos if bos is not None else tokenizer.eos_token_id


def _documents(spec: JobSpec):
    c = spec.corpus
    return read_corpus(
        c.kind,
        c.paths,
        text_field=c.text_field,
        id_field=c.id_field,
        language_field=c.language_field,
        max_doc_bytes=c.max_doc_bytes,
    )


def plan_windows(
    documents: Iterable[Document],
    tokenizer: Any,
    tokens: TokensSpec,
    lookahead: Sequence[int],
    *,
    docs_sink: list | None = None,
    annotate: bool = True,
    token_counts: np.ndarray | None = None,
    counts_sink: TokenCounts | None = None,
) -> Iterator[WindowTask]:
    """Windows with their targets, in corpus order; records each document in ``docs_sink``.

    With ``annotate`` each window also carries its emitted tokens' byte spans, lines and syntax
    categories (``codelens.engine.data.syntax``), from the same single tokenizer pass as the ids.
    The counting pass (``plan_corpus``) needs only the ids and skips that work (and the lexer).
    Annotated windows also carry their tokens' copying features (``codelens.engine.data.repeats``:
    ``target_seen``, ``line_repeat``, and ``target_freq_bucket`` from ``token_counts``).

    Args:
        documents: the corpus, in order.
        tokenizer: the model's (fast) tokenizer.
        tokens: the job's ``tokens`` section (window, overlap, BOS).
        lookahead: the look-ahead offsets of the targets (``lens.lookahead``).
        docs_sink: when given, gets one docs.parquet row per document.
        annotate: compute the spans and copying features.
        token_counts: corpus occurrences per token id (``CorpusPlan.token_counts``); None leaves
            ``target_freq_bucket`` at -1.
        counts_sink: when given, counts the ids of every ``ok`` document.
    """
    bos = bos_id(tokens, tokenizer)
    tokenized = tokenize_documents(documents, tokenizer, spans=annotate)
    for document, ids, spans in tokenized:
        status = document.status
        if document.ok and not ids:
            status = "empty"  # text that tokenizes to nothing (e.g. only a BOM)
        if docs_sink is not None:
            docs_sink.append(
                (document.doc, document.source, len(ids or ()), status, document.language)
            )
        if not ids:
            continue
        if counts_sink is not None and document.ok:
            counts_sink.add(ids)
        copy = None
        if annotate:
            lines = None if spans is None else spans.line
            copy = CopyFeatures.of_document(ids, token_counts, document.text, lines)
        for w in make_windows(
            document.doc, ids, window=tokens.window, overlap=tokens.overlap, bos_id=bos
        ):
            # [1 + A, n_emit] -> [n_emit, 1 + A]; one list per offset is far faster than per row.
            columns = np.asarray(
                target_columns(ids, w.first_pos, w.n_emit, lookahead), dtype=np.int32
            )
            yield WindowTask(
                w.doc,
                tuple(w.input_ids),
                w.first_pos,
                np.ascontiguousarray(columns.T),
                language=document.language,
                spans=None if spans is None else spans.slice(w.first_pos, w.first_pos + w.n_emit),
                copy=None if copy is None else copy.slice(w.first_pos, w.first_pos + w.n_emit),
            )


def plan_document(
    document: Document, tokenizer: Any, tokens: TokensSpec, lookahead: Sequence[int]
) -> tuple[WindowTask, ...]:
    """The windows of a corpus of one document (the notebook API's ``Lens.text``).

    Two passes, as for a job: the first counts the document's token ids (its corpus is itself),
    the second plans the windows with those counts.
    """
    counts = TokenCounts()
    for _ in plan_windows(
        [document], tokenizer, tokens, lookahead, annotate=False, counts_sink=counts
    ):
        pass
    return tuple(plan_windows([document], tokenizer, tokens, lookahead, token_counts=counts.counts))


def iter_shards(
    spec: JobSpec, tokenizer: Any, token_counts: np.ndarray | None = None
) -> Iterator[Shard]:
    """The job's shards in order; each holds its ``WindowTask``s.

    Args:
        spec: the job.
        tokenizer: the model's tokenizer.
        token_counts: ``CorpusPlan.token_counts`` of the same job (None: ``target_freq_bucket``
            is -1 in every row).
    """
    windows = plan_windows(
        _documents(spec), tokenizer, spec.tokens, spec.lens.lookahead, token_counts=token_counts
    )
    return plan_shards(windows, spec.output.shard_tokens)


def plan_corpus(spec: JobSpec, tokenizer: Any) -> CorpusPlan:
    """Counting pass: docs.parquet content, tokens per shard and token counts (no windows kept)."""
    docs: list[tuple] = []
    counts = TokenCounts()
    windows = plan_windows(
        _documents(spec),
        tokenizer,
        spec.tokens,
        spec.lens.lookahead,
        docs_sink=docs,
        annotate=False,
        counts_sink=counts,
    )
    shard_tokens = tuple(s.n_tokens for s in plan_shards(windows, spec.output.shard_tokens))
    columns = list(zip(*docs, strict=True)) if docs else [[] for _ in DOCS_SCHEMA]
    table = pa.Table.from_arrays(
        [pa.array(col, type=field.type) for col, field in zip(columns, DOCS_SCHEMA, strict=True)],
        schema=DOCS_SCHEMA,
    )
    return CorpusPlan(table, shard_tokens, counts.counts)
