"""Tokenization, windows with overlap, targets and shard planning."""

from __future__ import annotations

import random

import pytest

from codelens.engine.data.tokenize import tokenize_documents
from codelens.engine.data.windows import Shard, Window, make_windows, plan_shards, target_columns

BOS = 999

# --- windows -----------------------------------------------------------------------------------


def check_windows(n: int, window: int, overlap: int, bos: int | None) -> list[Window]:
    ids = list(range(1000, 1000 + n))  # distinct ids: a slice check is a position check
    wins = make_windows(7, ids, window=window, overlap=overlap, bos_id=bos)
    emitted: list[int] = []
    for k, w in enumerate(wins):
        assert w.doc == 7
        assert 1 <= w.n_emit <= len(w.input_ids) <= window
        body = w.input_ids
        if bos is not None:
            assert body[0] == bos
            body = body[1:]
        # Carried context: none in the first window, exactly `overlap` tokens after it.
        context = 0 if k == 0 else overlap
        assert len(body) == context + w.n_emit
        assert body == ids[w.first_pos - context : w.first_pos + w.n_emit]
        assert w.emit_start == len(w.input_ids) - w.n_emit
        emitted.extend(range(w.first_pos, w.first_pos + w.n_emit))
    assert emitted == list(range(n))  # every position exactly once, in order
    if n:
        # Windows are as full as allowed except the last one.
        assert all(len(w.input_ids) == window for w in wins[:-1])
    return wins


def test_windows_property_over_many_settings() -> None:
    combos = 0
    for bos in (None, BOS):
        for window in range(2 + (bos is not None), 11):
            capacity = window - (bos is not None)
            for overlap in range(capacity):
                for n in (*range(0, 25), 57, 100):
                    check_windows(n, window, overlap, bos)
                    combos += 1
    assert combos > 2000


def test_windows_random_large() -> None:
    rng = random.Random(0)
    for _ in range(50):
        bos = rng.choice([None, BOS])
        window = rng.randint(3, 300)
        overlap = rng.randint(0, window - 2 - (bos is not None))
        check_windows(rng.randint(0, 5000), window, overlap, bos)


def test_windows_example_from_docstring() -> None:
    wins = make_windows(0, list(range(15)), window=8, overlap=2, bos_id=BOS)
    assert [(w.input_ids, w.first_pos, w.n_emit) for w in wins] == [
        ([BOS, 0, 1, 2, 3, 4, 5, 6], 0, 7),
        ([BOS, 5, 6, 7, 8, 9, 10, 11], 7, 5),
        ([BOS, 10, 11, 12, 13, 14], 12, 3),
    ]


@pytest.mark.parametrize(
    ("window", "overlap", "bos", "match"),
    [
        (1, 0, None, "window must be >= 2"),
        (2, 0, BOS, "window must be >= 3"),
        (4, 4, None, "overlap must be in 0..3"),
        (4, 3, BOS, "overlap must be in 0..2"),
        (4, -1, None, "overlap must be in 0..3"),
    ],
)
def test_window_validation(window: int, overlap: int, bos: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_windows(0, [1, 2, 3], window=window, overlap=overlap, bos_id=bos)


# --- targets -----------------------------------------------------------------------------------


def test_targets_across_windows_with_lookahead() -> None:
    rng = random.Random(1)
    for n, window, overlap, bos in [(1, 2, 0, None), (13, 4, 1, BOS), (40, 7, 3, None)]:
        x = [rng.randrange(50_000) for _ in range(n)]
        offsets = (2, 3, 5)
        rows: list[list[int]] = []
        for w in make_windows(3, x, window=window, overlap=overlap, bos_id=bos):
            columns = target_columns(x, w.first_pos, w.n_emit, offsets)
            rows.extend([list(r) for r in zip(*columns, strict=True)])
        expected = [[x[i + o] if i + o < n else -1 for o in (1, *offsets)] for i in range(n)]
        assert rows == expected
        assert rows[-1][0] == -1  # the document's last token has no target


def test_targets_without_offsets_and_validation() -> None:
    assert target_columns([5, 6, 7], 1, 2, []) == [[7, -1]]
    assert target_columns([5, 6, 7], 0, 0, [2]) == [[], []]
    assert target_columns((5, 6, 7), 0, 3, [2]) == [[6, 7, -1], [7, -1, -1]]
    with pytest.raises(ValueError, match="offsets must be >= 1"):
        target_columns([5, 6, 7], 0, 1, [0])
    with pytest.raises(ValueError, match="outside a document of 3 tokens"):
        target_columns([5, 6, 7], 2, 2, [])


# --- shards ------------------------------------------------------------------------------------


def corpus_windows(seed: int = 0) -> list[Window]:
    rng = random.Random(seed)
    wins: list[Window] = []
    for d in range(40):
        n = rng.choice([0, 1, 5, 30, 200, 1000])
        wins += make_windows(d, list(range(n)), window=64, overlap=8, bos_id=BOS)
    return wins


@pytest.mark.parametrize("shard_tokens", [1, 50, 63, 500, 10**9])
def test_plan_shards_covers_all_windows_in_order(shard_tokens: int) -> None:
    wins = corpus_windows()
    shards = list(plan_shards(iter(wins), shard_tokens))
    assert [s.index for s in shards] == list(range(len(shards)))
    assert [w for s in shards for w in s.windows] == wins
    for s in shards:
        assert isinstance(s, Shard) and s.windows
        assert s.n_tokens == sum(w.n_emit for w in s.windows)
        # Overshoot is less than the last window's emitted tokens.
        assert s.n_tokens - s.windows[-1].n_emit < shard_tokens
    for s in shards[:-1]:
        assert s.n_tokens >= shard_tokens
    assert shards[-1].n_tokens <= shard_tokens + 63


def test_plan_shards_deterministic_and_doc_spans_shards() -> None:
    first = list(plan_shards(corpus_windows(), 100))
    second = list(plan_shards(iter(corpus_windows()), 100))
    assert first == second
    docs_per_shard = [{w.doc for w in s.windows} for s in first]
    spanning = [d for d in range(40) if sum(d in ds for ds in docs_per_shard) > 1]
    assert spanning  # long documents continue in the next shard


def test_plan_shards_edge_cases() -> None:
    assert list(plan_shards([], 10)) == []
    with pytest.raises(ValueError, match="shard_tokens must be >= 1"):
        plan_shards(corpus_windows(), 0)


def test_end_to_end_tokens_to_shards(tokenizer, make_doc, training_texts) -> None:
    docs = [make_doc(i, t) for i, t in enumerate(training_texts * 3)]
    docs.append(make_doc(len(docs), None, "empty"))
    tokenized = list(tokenize_documents(docs, tokenizer))
    windows = [
        w
        for document, ids, _ in tokenized
        if ids
        for w in make_windows(document.doc, ids, window=8, overlap=2, bos_id=tokenizer.bos_token_id)
    ]
    shards = list(plan_shards(windows, 20))
    total = sum(len(ids) for _, ids, _ in tokenized if ids is not None)
    assert sum(s.n_tokens for s in shards) == total
    rows = {(w.doc, w.first_pos + j) for s in shards for w in s.windows for j in range(w.n_emit)}
    assert len(rows) == total
