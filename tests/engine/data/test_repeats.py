"""Copying features: target_seen, target_freq_bucket, line_repeat (engine/data/repeats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from codelens.engine.data.repeats import (
    CopyFeatures,
    TokenCounts,
    freq_bucket,
    repeated_lines,
    target_seen,
)


def _seen_by_loop(ids: list[int]) -> list[int]:
    return [int(ids[p + 1] in ids[: p + 1]) for p in range(len(ids) - 1)] + [-1]


@pytest.mark.parametrize(
    "ids",
    [
        [],
        [7],
        [7, 7],
        [1, 2, 3],
        [5, 1, 5, 1, 2, 5],
        list(np.random.default_rng(0).integers(0, 9, 200)),
    ],
)
def test_target_seen_matches_a_loop(ids) -> None:
    ids = [int(i) for i in ids]
    assert target_seen(ids).tolist() == (_seen_by_loop(ids) if ids else [])


def test_freq_bucket_is_floor_log2_of_the_corpus_count() -> None:
    counts = TokenCounts()
    counts.add([0, 1, 1, 2, 2, 2])
    counts.add([2, 9])  # grows past the first document's largest id
    c = counts.counts
    assert c.tolist() == [1, 2, 4, 0, 0, 0, 0, 0, 0, 1]
    got = freq_bucket(np.array([0, 1, 2, 9, -1, 5, 40]), c).tolist()
    # 5 was never counted and 40 lies past the table: no bucket, like a missing target.
    assert got == [0, 1, 2, 0, -1, -1, -1]
    big = np.array([0, 2**40 - 1, 2**40], dtype=np.int64)
    assert freq_bucket(np.array([1, 2]), big).tolist() == [39, 40]
    for n in (1, 3, 4, 1000, 1023, 1024):
        assert freq_bucket(np.array([0]), np.array([n])).tolist() == [math.floor(math.log2(n))]


def test_repeated_lines_ignore_leading_whitespace_and_never_count_blank_lines() -> None:
    text = "x = 1\n\nif x:\n    x = 1\n\n  \ty = 2\ny = 2 \ny = 2\nx = 1"
    # lines:  1      2  3      4         5  6           7       8      9
    assert np.flatnonzero(repeated_lines(text)).tolist() == [4, 8, 9]
    assert repeated_lines("").tolist() == [False, False]


def test_features_of_a_document_and_their_slices() -> None:
    ids = [3, 4, 3, 4, 5]
    lines = np.array([1, 1, 2, 2, 3])
    counts = np.array([0, 0, 0, 2, 2, 1])
    f = CopyFeatures.of_document(ids, counts, "a b\na b\nc", lines)
    assert f.target_seen.tolist() == [0, 1, 1, 0, -1]
    assert f.target_freq_bucket.tolist() == [1, 1, 1, 0, -1]
    assert f.line_repeat.tolist() == [0, 0, 1, 1, 0]
    part = f.slice(1, 3)
    assert part.target_seen.tolist() == [1, 1] and part.line_repeat.tolist() == [0, 1]
    blind = CopyFeatures.of_document(ids, None)
    assert blind.target_freq_bucket.tolist() == [-1] * 5 and blind.line_repeat.tolist() == [-1] * 5
