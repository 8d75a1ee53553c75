"""Copying and frequency features of each token, from the planner's tokenizer pass.

The seeds' copying question (nostalgebraist: a repeated phrase, or a rare token seen once in the
context, is predicted correctly only in late layers) needs three facts per row, all computed here
from token ids and the document text, so every row and every grouping of ``summary.json`` agree:

``target_seen``
    whether the row's target ``x[pos + 1]`` already occurs in the document at a position
    ``<= pos``; null (``-1`` here) for the document's last token, which has no target.
``target_freq_bucket``
    ``floor(log2(c))``, ``c`` the number of times the target id occurs over all ``ok`` documents of
    the corpus; ``-1`` where there is no target. The counts come from the planner's counting pass
    (:class:`TokenCounts`), so they need the whole corpus before the first shard is planned.
``line_repeat``
    whether the token's line (``\\n``-separated, as ``line`` counts) repeats an earlier line of the
    document verbatim once leading whitespace is ignored. Blank lines are never repeats. Null
    (``-1``) for windows planned without source spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NO_VALUE = -1
"""The int8 marker of a null ``target_seen`` / ``line_repeat`` and of a missing frequency bucket."""


class TokenCounts:
    """Occurrences of each token id over a corpus, accumulated document by document."""

    def __init__(self) -> None:
        self._counts = np.zeros(0, np.int64)

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Count one document's token ids (O(n log n) in the document, not O(vocabulary))."""
        values, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        if values.size == 0:
            return
        need = int(values[-1]) + 1
        if need > self._counts.shape[0]:
            grown = np.zeros(max(need, 2 * self._counts.shape[0]), np.int64)
            grown[: self._counts.shape[0]] = self._counts
            self._counts = grown
        self._counts[values] += counts

    @property
    def counts(self) -> np.ndarray:
        """``[max id + 1]`` int64 occurrences of each id (ids never seen count 0)."""
        seen = np.flatnonzero(self._counts)
        return self._counts[: int(seen[-1]) + 1 if seen.size else 0].copy()


def freq_bucket(target_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[n]`` int8 ``floor(log2(counts[target]))``; -1 where the target is -1 (or never counted).

    Args:
        target_ids: ``[n]`` next-token ids, -1 for none.
        counts: ``[V']`` corpus occurrences per id (:attr:`TokenCounts.counts`).
    """
    t = np.asarray(target_ids, dtype=np.int64)
    known = (t >= 0) & (t < counts.shape[0])
    c = np.where(known, counts[np.where(known, t, 0)], 0)
    # frexp is exact where log2 of a float is not: 2^e <= c < 2^(e+1) gives exponent e + 1.
    bucket = np.frexp(np.maximum(c, 1).astype(np.float64))[1] - 1
    return np.where(c > 0, bucket, NO_VALUE).astype(np.int8)


def target_seen(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[n]`` int8 for a document of ``n`` tokens: 1 when ``x[p + 1]`` occurs in ``x[0 .. p]``.

    The last position has no target (-1).
    """
    x = np.asarray(ids, dtype=np.int64)
    out = np.full(x.shape[0], NO_VALUE, np.int8)
    if x.shape[0] < 2:
        return out
    _, first_index, inverse = np.unique(x, return_index=True, return_inverse=True)
    first_occurrence = first_index[inverse]  # [n]: where x[j]'s id first appears
    # x[p + 1] was seen at or before p exactly when its first occurrence is before p + 1.
    out[:-1] = (first_occurrence[1:] < np.arange(1, x.shape[0])).astype(np.int8)
    return out


def repeated_lines(text: str) -> np.ndarray:
    """``[n_lines + 1]`` bool, indexed by 1-based line number: the line repeats an earlier one.

    Lines are split on ``\\n`` (as the ``line`` column counts them) and compared after stripping
    leading whitespace; a blank line is never a repeat. Index 0 is unused (False).
    """
    lines = text.split("\n")
    out = np.zeros(len(lines) + 1, bool)
    earlier: set[str] = set()
    for number, line in enumerate(lines, start=1):
        body = line.lstrip()
        if not body:
            continue
        if body in earlier:
            out[number] = True
        else:
            earlier.add(body)
    return out


@dataclass(frozen=True)
class CopyFeatures:
    """``target_seen``, ``target_freq_bucket`` and ``line_repeat`` of consecutive tokens.

    Attributes:
        target_seen: ``[n]`` int8: 1 / 0, -1 where there is no target.
        target_freq_bucket: ``[n]`` int8: ``floor(log2(corpus count of the target))``, -1 where
            there is no target.
        line_repeat: ``[n]`` int8: 1 / 0, -1 where the token's line is unknown.
    """

    target_seen: np.ndarray
    target_freq_bucket: np.ndarray
    line_repeat: np.ndarray

    @classmethod
    def of_document(
        cls,
        ids: Sequence[int],
        counts: np.ndarray | None,
        text: str | None = None,
        token_lines: np.ndarray | None = None,
    ) -> CopyFeatures:
        """The features of every token of one document.

        Args:
            ids: the document's token ids (no BOS).
            counts: corpus occurrences per id; None leaves every bucket -1.
            text: the document's text; with ``token_lines`` it gives ``line_repeat``.
            token_lines: ``[n]`` 1-based line of each token (``TokenSpans.line``).
        """
        x = np.asarray(ids, dtype=np.int64)
        targets = np.append(x[1:], NO_VALUE)
        buckets = (
            np.full(x.shape[0], NO_VALUE, np.int8)
            if counts is None
            else freq_bucket(targets, counts)
        )
        if text is None or token_lines is None:
            repeat = np.full(x.shape[0], NO_VALUE, np.int8)
        else:
            repeat = repeated_lines(text)[np.asarray(token_lines, dtype=np.int64)].astype(np.int8)
        return cls(target_seen(x), buckets, repeat)

    def slice(self, start: int, stop: int) -> CopyFeatures:
        """Tokens ``start .. stop - 1`` (copies, so a window does not pin its document's arrays)."""
        return CopyFeatures(
            self.target_seen[start:stop].copy(),
            self.target_freq_bucket[start:stop].copy(),
            self.line_repeat[start:stop].copy(),
        )
