"""Corpus aggregates per layer, built from mergeable per-shard partials.

Each shard contributes sums, counts and histograms (never means or quantiles, which do not merge);
the run's ``summary.json`` is a pure function of the committed shards' partials, merged in shard
order, so it does not depend on which worker ran which shard or when: a local and a Ray run of the
same job give identical numbers.

A shard's partials are a JSON object::

    {"<layer>": layer partial, ...,                      one per written layer
     "convergence": {"all": {"<layer>": n}, "by_category": {cat: {...}},
                     "by_language": {lang: {...}}, "undefined": n}}

A layer partial holds the sums over all of the layer's rows, plus the same sums per syntax category
(``by_category``), per document language (``by_language``; ``unknown`` for none) and per log2
bucket of the token's document position (``by_position``) and byte column in its line
(``by_column``), each group listed only when it has rows. ``attn``-site rows (``lens.sites``) have
their own layer partials keyed ``attn:<layer>`` (finalized into ``attn_layers``). Merging adds
numbers, adds lists element-wise and takes the union of dict keys (a language seen in one shard
only is simply carried over).

Quantiles come from histograms: target ranks in log2 bins (bin 0 holds rank 0, bin b >= 1 ranks
``[2^(b-1), 2^b)``), target log-probs in bins of 1/8 nat down to -64 (overall rows only, not per
group, to keep manifest lines small). A quantile is reported as the lower edge of the bin that holds
it (exact for ranks 0 and 1; within 1/8 nat for log-probs).

The **convergence layer** of a token is the first captured layer from which the final layer's top-1
token stays top-1 at every later captured layer (with ``lens.layers: all``, every layer). It is
``L`` when only the last layer has it, and undefined when the token's final-layer residual is not
finite. A non-finite row at an earlier layer counts as disagreeing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from torch import Tensor

from codelens.engine.data.syntax import CATEGORIES
from codelens.engine.data.windows import WindowTask
from codelens.engine.run.pipeline import LensBatch
from codelens.engine.run.request import ATTN_SITE, BLOCK_SITE, ResolvedLens
from codelens.kernels import LensStats

RANK_BINS = 33
LOGPROB_BIN_WIDTH = 0.125
LOGPROB_BINS = 512  # [-64, 0] in steps of 1/8 nat; lower values fall in the last bin
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CONVERGENCE_KEY = "convergence"
UNKNOWN_LANGUAGE = "unknown"
CONVERGENCE_DEFINITION = (
    "per token: the first captured layer from which the final layer's top-1 token stays top-1 "
    "through the last layer; undefined when the final-layer residual is not finite"
)

ATTN_PREFIX = "attn:"
"""Partials of ``attn``-site rows are keyed ``attn:<layer>`` (block rows: ``<layer>``)."""
GROUP_KINDS = ("category", "language", "position", "column", "seen", "freq_bucket", "line_repeat")
"""Groupings of summary.json: syntax category, document language, the log2 buckets of the
token's position in its document and of its byte column within its line, and the copying features
(``codelens.engine.data.repeats``): whether the target was seen earlier in the document, the log2
bucket of the target's corpus count, and whether the token's line repeats an earlier line."""
N_POSITION_BUCKETS = 32
SEEN_NAMES = ("seen", "novel")
"""Groups of ``by_seen``: the target occurs earlier in the document / it does not."""
LINE_REPEAT_NAMES = ("repeated", "not_repeated")
"""Groups of ``by_line_repeat``: the token's line repeats an earlier line / it does not."""
N_FREQ_BUCKETS = 64
FREQ_BUCKET_NAMES = tuple(str(b) for b in range(N_FREQ_BUCKETS))
"""``by_freq_bucket`` groups: ``"b"`` holds targets seen ``2^b .. 2^(b+1) - 1`` times in the
corpus (``floor(log2(count))``)."""


def bucket_names() -> list[str]:
    """Names of the log2 position buckets: ``0``, ``1``, ``2-3``, ``4-7``, ..."""
    return ["0", "1"] + [f"{2 ** (b - 1)}-{2**b - 1}" for b in range(2, N_POSITION_BUCKETS)]


def position_bucket(values: np.ndarray) -> np.ndarray:
    """log2 bucket of non-negative integers (0 -> 0, 1 -> 1, [2^(b-1), 2^b) -> b); -1 stays -1."""
    v = np.asarray(values, dtype=np.int64)
    b = np.where(v < 1, 0, np.floor(np.log2(np.maximum(v, 1))).astype(np.int64) + 1)
    return np.where(v < 0, -1, np.minimum(b, N_POSITION_BUCKETS - 1)).astype(np.int64)


GroupIds = Mapping[str, tuple[np.ndarray, Sequence[str]]]
"""Groupings of a shard's tokens: kind (``category``, ``language``) -> ``(ids [T], names)``;
``ids[i]`` indexes ``names``; a negative id leaves the token out of that grouping."""


def _rank_bin(rank: np.ndarray) -> np.ndarray:
    r = rank.astype(np.float64)
    bins = np.where(r < 1, 0.0, np.floor(np.log2(np.maximum(r, 1))) + 1)
    return np.clip(bins, 0, RANK_BINS - 1).astype(np.int64)


def _logprob_bin(logprob: np.ndarray) -> np.ndarray:
    idx = np.floor(-np.nan_to_num(logprob.astype(np.float64), nan=0.0) / LOGPROB_BIN_WIDTH)
    return np.clip(idx, 0, LOGPROB_BINS - 1).astype(np.int64)


@dataclass(frozen=True)
class RowValues:
    """What the aggregates read of lens rows: n row kinds (layers) over the same T tokens.

    Built from the lens statistics with :meth:`of`; every array is numpy on the CPU.

    Attributes:
        target_logprob, target_rank, top1, finite: ``[n, T]``.
        entropy, kl_final: ``[n, T]``, or None when the job does not compute them.
        ahead_logprob, ahead_rank: ``[n, T, A]``.
        set_logmass: ``[n, T, S]``.
        final_top1: ``[T]`` the final layer's top-1 id of each token.
        target_id: ``[T]`` each token's next token (-1 without one).
    """

    target_logprob: np.ndarray
    target_rank: np.ndarray
    top1: np.ndarray
    finite: np.ndarray
    entropy: np.ndarray | None
    kl_final: np.ndarray | None
    ahead_logprob: np.ndarray
    ahead_rank: np.ndarray
    set_logmass: np.ndarray
    final_top1: np.ndarray
    target_id: np.ndarray

    @classmethod
    def of(
        cls, stats: LensStats, slots: Sequence[int], *, final_slot: int, target_id: Tensor
    ) -> RowValues:
        """The rows of buffer ``slots`` of ``stats`` (``[n_slots, T, ...]``, CPU)."""

        def pick(x: Tensor | None) -> np.ndarray | None:
            return None if x is None else x[list(slots)].numpy()

        top1 = stats.topk_ids[..., 0]
        return cls(
            target_logprob=pick(stats.target_logprob),
            target_rank=pick(stats.target_rank),
            top1=pick(top1),
            finite=pick(stats.finite),
            entropy=pick(stats.entropy),
            kl_final=pick(stats.kl_final),
            ahead_logprob=pick(stats.ahead_logprob),
            ahead_rank=pick(stats.ahead_rank),
            set_logmass=pick(stats.set_logmass),
            final_top1=top1[final_slot].numpy(),
            target_id=target_id.numpy(),
        )

    def flat(self) -> RowValues:
        """Every row as its own entry: ``[T * n, ...]`` arrays, token-major (row ``i * n + l``
        is layer ``l`` of token ``i``); the per-token ``final_top1``/``target_id`` repeated per
        layer.

        Token-major because the partials sum each group's rows in token order with one
        ``bincount`` per statistic: consecutive rows then fall in different layers' bins, so the
        additions do not wait on each other (layer-major, a bin takes thousands of rows in a
        row, each addition waiting for the one before: ~3x slower), and each bin still adds its
        rows in token order."""
        n, t = self.target_logprob.shape

        def merge(x: np.ndarray | None) -> np.ndarray | None:
            return (
                None
                if x is None
                else np.ascontiguousarray(x.swapaxes(0, 1)).reshape(t * n, *x.shape[2:])
            )

        per_row = {
            f.name: merge(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("final_top1", "target_id")
        }
        return RowValues(
            **per_row,
            final_top1=np.repeat(self.final_top1, n),
            target_id=np.repeat(self.target_id, n),
        )


@dataclass(frozen=True)
class RowFlags:
    """What every grouping of a shard's flat rows sums, derived once per shard: each statistic as
    a contiguous float64 weight per row, 0 where the statistic leaves the row out, so that a
    grouping's partial is one ``bincount`` per statistic over the group index, with no row
    selection (``[R]`` arrays; one per offset or set in the lists).

    Attributes:
        finite, has_target: 1 for a row whose residual was finite / finite with a next token.
        target_logprob, entropy, kl_final: the values on those rows (entropy and KL on finite
            rows; None when not computed).
        top1_correct, top10, agree_final: 1 where has_target and the top-1 is the target / its
            rank is below 10; finite and the top-1 is the final layer's.
        rank_bin, logprob_bin: the target's ``RANK_BINS`` / ``LOGPROB_BINS`` bin, or the extra
            bin ``RANK_BINS`` / ``LOGPROB_BINS`` on rows without a target.
        ahead_ok, ahead_top1, ahead_logprob: per offset: finite with that token / and it ranks
            first / its log-prob there.
        set_mass: per token set: its mass on finite rows.
    """

    finite: np.ndarray
    has_target: np.ndarray
    target_logprob: np.ndarray
    entropy: np.ndarray | None
    kl_final: np.ndarray | None
    top1_correct: np.ndarray
    top10: np.ndarray
    agree_final: np.ndarray
    rank_bin: np.ndarray
    logprob_bin: np.ndarray
    ahead_ok: list[np.ndarray]
    ahead_top1: list[np.ndarray]
    ahead_logprob: list[np.ndarray]
    set_mass: list[np.ndarray]

    @classmethod
    def of(cls, rows: RowValues) -> RowFlags:
        finite = rows.finite
        has = (rows.target_id >= 0) & finite

        def on(mask: np.ndarray, values: np.ndarray | None) -> np.ndarray | None:
            # x + 0.0 == x, so the zeros leave every group's sum as the selected rows' was.
            return None if values is None else np.where(mask, values.astype(np.float64), 0.0)

        def weight(mask: np.ndarray) -> np.ndarray:
            return mask.astype(np.float64)

        ahead_ok = (rows.ahead_rank >= 0) & finite[:, None]
        offsets = range(rows.ahead_rank.shape[-1])
        return cls(
            finite=weight(finite),
            has_target=weight(has),
            target_logprob=on(has, rows.target_logprob),
            entropy=on(finite, rows.entropy),
            kl_final=on(finite, rows.kl_final),
            top1_correct=weight(has & (rows.top1 == rows.target_id)),
            top10=weight(has & (rows.target_rank < 10)),
            agree_final=weight(finite & (rows.top1 == rows.final_top1)),
            rank_bin=np.where(has, _rank_bin(rows.target_rank), RANK_BINS),
            logprob_bin=np.where(has, _logprob_bin(rows.target_logprob), LOGPROB_BINS),
            ahead_ok=[weight(ahead_ok[:, a]) for a in offsets],
            ahead_top1=[weight(ahead_ok[:, a] & (rows.ahead_rank[:, a] == 0)) for a in offsets],
            ahead_logprob=[on(ahead_ok[:, a], rows.ahead_logprob[:, a]) for a in offsets],
            set_mass=[
                on(finite, np.exp(rows.set_logmass[:, j].astype(np.float64)))
                for j in range(rows.set_logmass.shape[-1])
            ],
        )


def group_partials(
    group: np.ndarray,
    n_groups: int,
    rows: RowValues,
    set_names: Sequence[str],
    *,
    logprob_hist: bool = False,
    flags: RowFlags | None = None,
) -> list[dict[str, Any]]:
    """Partial aggregates of rows, per group (one ``bincount`` per statistic).

    Args:
        group: ``[R]`` group index of each row in ``0 .. n_groups - 1``; rows with a negative
            index are left out.
        n_groups: number of groups.
        rows: the R rows, flat (:meth:`RowValues.flat`: ``[R]`` and ``[R, A|S]`` arrays).
        set_names: the ``S`` token-set names.
        logprob_hist: also histogram the target log-probs (512 bins; overall rows only).
        flags: ``RowFlags.of(rows)``, when the caller groups the same rows several ways.

    Returns:
        One partial per group, with the keys ``rows``, ``nonfinite``, ``count``,
        ``sum_logprob``, ``sum_entropy``/``sum_kl`` (None when not computed), ``top1_correct``,
        ``top1_agree_final``, ``top10``, ``rank_hist`` (``RANK_BINS``), ``logprob_hist``
        (``LOGPROB_BINS``), ``ahead_count``/``ahead_top1``/``ahead_sum_logprob`` (one per
        look-ahead offset) and ``set_sum_mass`` (token-set name -> sum of masses).
    """
    # numpy, not torch: these are tiny sequential reductions, and torch's thread pool makes each
    # one ~100x slower on a busy CPU. np.bincount sums float64 weights in index order, so the
    # result is deterministic (a Ray worker computes the same numbers as the local one). Rows
    # outside every group go to one extra bin, dropped at the end.
    f = RowFlags.of(rows) if flags is None else flags
    trash = n_groups
    in_group = np.where(group >= 0, group, trash)

    def total(values: np.ndarray) -> list[float]:
        return np.bincount(in_group, weights=values, minlength=n_groups + 1)[:n_groups].tolist()

    def count(values: np.ndarray) -> list[int]:
        sums = np.bincount(in_group, weights=values, minlength=n_groups + 1)[:n_groups]
        return sums.astype(np.int64).tolist()  # sums of 0/1 weights: exact below 2^53

    def hist(bins: np.ndarray, n_bins: int) -> list[list[int]]:
        # ``bins`` has an extra bin (``n_bins``) for rows without a target.
        flat = np.bincount(in_group * (n_bins + 1) + bins, minlength=(n_groups + 1) * (n_bins + 1))
        return flat.reshape(n_groups + 1, n_bins + 1)[:n_groups, :n_bins].tolist()

    n_rows = np.bincount(in_group, minlength=n_groups + 1)[:n_groups].tolist()
    n_ok = count(f.finite)
    nonfinite = [r - k for r, k in zip(n_rows, n_ok, strict=True)]
    sum_ent = total(f.entropy) if f.entropy is not None else None
    sum_kl = total(f.kl_final) if f.kl_final is not None else None
    rank_h = hist(f.rank_bin, RANK_BINS)
    lp_h = hist(f.logprob_bin, LOGPROB_BINS) if logprob_hist else None
    ahead = [
        (count(ok), count(top1), total(lp))
        for ok, top1, lp in zip(f.ahead_ok, f.ahead_top1, f.ahead_logprob, strict=True)
    ]
    sums = {
        "count": count(f.has_target),
        "sum_logprob": total(f.target_logprob),
        "top1_correct": count(f.top1_correct),
        "top1_agree_final": count(f.agree_final),
        "top10": count(f.top10),
    }
    masses = {name: total(mass) for name, mass in zip(set_names, f.set_mass, strict=True)}

    out = []
    for i in range(n_groups):
        part = {
            "rows": n_rows[i],
            "nonfinite": nonfinite[i],
            "count": sums["count"][i],
            "sum_logprob": sums["sum_logprob"][i],
            "sum_entropy": None if sum_ent is None else sum_ent[i],
            "sum_kl": None if sum_kl is None else sum_kl[i],
            "top1_correct": sums["top1_correct"][i],
            "top1_agree_final": sums["top1_agree_final"][i],
            "top10": sums["top10"][i],
            "rank_hist": rank_h[i],
            "ahead_count": [c[i] for c, _, _ in ahead],
            "ahead_top1": [t[i] for _, t, _ in ahead],
            "ahead_sum_logprob": [s[i] for _, _, s in ahead],
            "set_sum_mass": {name: m[i] for name, m in masses.items()},
        }
        if lp_h is not None:
            part["logprob_hist"] = lp_h[i]
        out.append(part)
    return out


def layer_partials(
    rows: RowValues,
    layers: Sequence[int],
    set_names: Sequence[str],
    groups: GroupIds | None = None,
) -> dict[str, dict[str, Any]]:
    """Partial aggregates of several layers over the same T tokens, in one pass per grouping.

    Args:
        rows: the ``n`` layers' rows (``[n, T, ...]``).
        layers: the ``n`` layer numbers (the partials' keys).
        set_names: the ``S`` token-set names.
        groups: optional groupings of the T tokens (``{"category": (ids, names), ...}``); each
            adds a ``by_<kind>`` dict of the groups' partials (only groups with rows).

    Returns:
        ``{"<layer>": partial}``.
    """
    n, t = rows.target_logprob.shape
    # Rows of all layers in one flat batch, grouped by (layer, group): one bincount per statistic
    # for the whole shard instead of one per layer and group (what matters for 60-layer models).
    slot = np.tile(np.arange(n, dtype=np.int64), t)  # flat rows are token-major
    flat = rows.flat()
    flags = RowFlags.of(flat)
    overall = group_partials(slot, n, flat, set_names, logprob_hist=True, flags=flags)
    out = {str(layer): overall[i] for i, layer in enumerate(layers)}
    for kind, (ids, names) in (groups or {}).items():
        g = len(names)
        tiled = np.repeat(np.asarray(ids, dtype=np.int64), n)
        by_group = np.where(tiled >= 0, slot * g + tiled, -1)
        parts = group_partials(by_group, n * g, flat, set_names, flags=flags)
        for i, layer in enumerate(layers):
            mine = parts[i * g : (i + 1) * g]
            out[str(layer)][f"by_{kind}"] = {
                name: p for name, p in zip(names, mine, strict=True) if p["rows"]
            }
    return out


def convergence_layers(top1: np.ndarray, finite: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """Each token's convergence layer (see the module docstring).

    Args:
        top1: ``[C, T]`` top-1 ids at the captured layers, the final layer last.
        finite: ``[C, T]`` whether each row's residual was finite.
        layers: the ``C`` captured layer numbers, ascending.

    Returns:
        ``[T]`` int64 layer numbers; -1 where undefined (final-layer row not finite).
    """
    top1, finite = np.asarray(top1), np.asarray(finite)
    agree = (top1 == top1[-1]) & finite
    # stays[c, i]: the token agrees with the final top-1 at every captured layer from c on.
    stays = np.logical_and.accumulate(agree[::-1], axis=0)[::-1]
    first = stays.argmax(axis=0)  # the first True (the final row always agrees when finite)
    conv = np.asarray(layers, dtype=np.int64)[first]
    return np.where(finite[-1], conv, -1)


def convergence_partial(
    conv: np.ndarray, layers: Sequence[int], groups: GroupIds | None = None
) -> dict[str, Any]:
    """Histograms of convergence layers: overall and per group (only groups with tokens).

    Args:
        conv: ``[T]`` from :func:`convergence_layers`.
        layers: the captured layer numbers (every one gets a bin, zeros included).
        groups: as in :func:`layer_partials`.

    Returns:
        ``{"all": {"<layer>": n}, "by_<kind>": {name: {"<layer>": n}}, "undefined": n}``.
    """
    slot = {layer: i for i, layer in enumerate(layers)}
    lut = np.full(max(layers) + 1, -1, dtype=np.int64)
    for layer, i in slot.items():
        lut[layer] = i
    conv = np.asarray(conv).astype(np.int64)
    defined = conv >= 0
    s = lut[np.maximum(conv, 0)]
    n = len(layers)

    def as_dict(counts: list[int]) -> dict[str, int]:
        return {str(layer): counts[i] for layer, i in slot.items()}

    out: dict[str, Any] = {
        "all": as_dict(np.bincount(s[defined], minlength=n).tolist()),
        "undefined": int((~defined).sum()),
    }
    for kind, (ids, names) in (groups or {}).items():
        ids = np.asarray(ids).astype(np.int64)
        ok = defined & (ids >= 0)
        flat = np.bincount(ids[ok] * n + s[ok], minlength=len(names) * n).reshape(len(names), n)
        out[f"by_{kind}"] = {
            name: as_dict(row) for name, row in zip(names, flat.tolist(), strict=True) if sum(row)
        }
    return out


def token_groups(windows: Sequence[WindowTask]) -> GroupIds:
    """Each emitted token's syntax category, language and position buckets, as group ids."""

    def per_token(value: Callable[[WindowTask], np.ndarray]) -> np.ndarray:
        return np.concatenate([value(w) for w in windows] or [np.zeros(0, np.int64)])

    def no_spans(w: WindowTask) -> np.ndarray:
        return np.full(w.n_emit, -1, np.int64)

    languages = sorted({w.language or UNKNOWN_LANGUAGE for w in windows})
    index = {name: i for i, name in enumerate(languages)}
    category = per_token(
        lambda w: no_spans(w) if w.spans is None else w.spans.category.astype(np.int64)
    )
    language = per_token(
        lambda w: np.full(w.n_emit, index[w.language or UNKNOWN_LANGUAGE], np.int64)
    )
    pos = per_token(lambda w: np.arange(w.first_pos, w.first_pos + w.n_emit))
    column = per_token(
        lambda w: (
            no_spans(w)
            if w.spans is None or w.spans.column is None
            else w.spans.column.astype(np.int64)
        )
    )
    buckets = bucket_names()

    def copy_feature(name: str) -> np.ndarray:
        return per_token(
            lambda w: no_spans(w) if w.copy is None else getattr(w.copy, name).astype(np.int64)
        )

    def yes_no(flag: np.ndarray) -> np.ndarray:
        return np.where(flag < 0, -1, 1 - flag)  # 1 -> group 0 ("seen"), 0 -> group 1

    return {
        "category": (category, CATEGORIES),
        "language": (language, languages),
        "position": (position_bucket(pos), buckets),
        "column": (position_bucket(column), buckets),
        "seen": (yes_no(copy_feature("target_seen")), SEEN_NAMES),
        "freq_bucket": (copy_feature("target_freq_bucket"), FREQ_BUCKET_NAMES),
        "line_repeat": (yes_no(copy_feature("line_repeat")), LINE_REPEAT_NAMES),
    }


def shard_partials(lens: ResolvedLens, batch: LensBatch) -> dict[str, dict[str, Any]]:
    """A shard's partial aggregates (for summary.json and the manifest).

    Per written layer (``<layer>``, and ``attn:<layer>`` for the ``attn`` site): overall and by
    group (:func:`token_groups`); then the histograms of the tokens' convergence layers over the
    captured block layers (``convergence``).

    Args:
        lens: the resolved request (slot layout, token-set names).
        batch: the shard's windows and their statistics, in window order
            (``ShardStats.assembled``).
    """
    groups = token_groups(batch.inputs)
    target_id = batch.targets[:, 0]
    out: dict[str, dict[str, Any]] = {}
    for site, prefix in ((BLOCK_SITE, ""), (ATTN_SITE, ATTN_PREFIX)):
        site_rows = lens.site_rows(site)
        if not site_rows:
            continue
        rows = RowValues.of(
            batch.stats,
            [slot for _, slot in site_rows],
            final_slot=lens.final_slot,
            target_id=target_id,
        )
        part = layer_partials(rows, [layer for layer, _ in site_rows], lens.set_names, groups)
        out.update({prefix + key: value for key, value in part.items()})
    n_cap = len(lens.captured)
    top1 = batch.stats.topk_ids[:n_cap, :, 0].numpy()
    conv = convergence_layers(top1, batch.stats.finite[:n_cap].numpy(), lens.captured)
    out[CONVERGENCE_KEY] = convergence_partial(conv, lens.captured, groups)
    return out


def _merge_into(acc: dict[str, Any], part: Mapping[str, Any]) -> None:
    for key, value in part.items():
        if key not in acc:
            acc[key] = _deep_copy(value)
        elif isinstance(value, Mapping):
            _merge_into(acc[key], value)
        elif isinstance(value, list):
            acc[key] = [x + y for x, y in zip(acc[key], value, strict=True)]
        elif value is None or acc[key] is None:
            # A statistic switched off is None in every shard of a job; keep whichever is set.
            acc[key] = value if acc[key] is None else acc[key]
        else:
            acc[key] = acc[key] + value


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def merge_partials(partials: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge shards' partials (in the given order, which fixes the float summation order).

    Numbers add, lists add element-wise, dicts merge by the union of their keys; a None (a
    statistic switched off) stays None.
    """
    merged: dict[str, Any] = {}
    for shard in partials:
        _merge_into(merged, shard)
    return merged


def _quantiles(hist: Sequence[int], edges: Sequence[float]) -> dict[str, float | None]:
    total = sum(hist)
    if total == 0:
        return {f"p{round(q * 100)}": None for q in QUANTILES}
    cum = np.cumsum(hist)
    return {f"p{round(q * 100)}": edges[int(np.searchsorted(cum, q * total))] for q in QUANTILES}


def _div(x: float | None, n: int) -> float | None:
    return x / n if n and x is not None else None


RANK_EDGES = [0] + [2 ** (b - 1) for b in range(1, RANK_BINS)]
"""Lower edge of each target-rank bin."""


def _summarize(p: Mapping[str, Any], lookahead: Sequence[int]) -> dict[str, Any]:
    """Means, rates and rank quantiles of one (layer or group) partial."""
    n, rows = p["count"], p["rows"] - p["nonfinite"]
    return {
        "rows": p["rows"],
        "nonfinite_rows": p["nonfinite"],
        "count": n,
        "mean_target_logprob": _div(p["sum_logprob"], n),
        "target_rank_quantiles": _quantiles(p["rank_hist"], RANK_EDGES),
        "top1_accuracy": _div(p["top1_correct"], n),
        "top10_accuracy": _div(p["top10"], n),
        "top1_agreement_final": _div(p["top1_agree_final"], rows),
        "mean_kl_final": _div(p["sum_kl"], rows),
        "mean_entropy": _div(p["sum_entropy"], rows),
        "lookahead": [
            {
                "offset": off,
                "count": p["ahead_count"][a],
                "top1_accuracy": _div(p["ahead_top1"][a], p["ahead_count"][a]),
                "mean_logprob": _div(p["ahead_sum_logprob"][a], p["ahead_count"][a]),
            }
            for a, off in enumerate(lookahead)
        ],
        "token_set_mean_mass": {
            name: _div(total, rows) for name, total in p["set_sum_mass"].items()
        },
    }


def _ordered(groups: Mapping[str, Any], kind: str) -> list[str]:
    """Categories in ``CATEGORIES`` order, buckets ascending, seen / repeated first, languages
    alphabetically."""
    if kind == "category":
        return [c for c in CATEGORIES if c in groups] + sorted(set(groups) - set(CATEGORIES))
    if kind in ("position", "column", "freq_bucket"):
        return sorted(groups, key=lambda name: int(name.split("-")[0]))
    fixed = {"seen": SEEN_NAMES, "line_repeat": LINE_REPEAT_NAMES}.get(kind)
    if fixed is not None:
        return [name for name in fixed if name in groups]
    return sorted(groups)


def _convergence_summary(hist: Mapping[str, int], layers: Sequence[int]) -> dict[str, Any]:
    counts = [int(hist.get(str(layer), 0)) for layer in layers]
    total = sum(counts)
    median = None
    if total:
        median = layers[int(np.searchsorted(np.cumsum(counts), 0.5 * total))]
    return {
        "tokens": total,
        "histogram": counts,
        "fraction": [c / total if total else None for c in counts],
        "mean_layer": _div(float(np.dot(counts, layers)), total),
        "median_layer": median,
    }


def finalize(merged: Mapping[str, Any], lookahead: Sequence[int]) -> dict[str, Any]:
    """Turn merged partials into the corpus aggregates written to summary.json.

    Returns:
        ``{"quantile_method", "categories", "layers": [per layer: the statistics, plus
        ``by_category`` / ``by_language`` with the same statistics per group], "convergence"}``.
    """
    # Lower edge of the log-prob bin: bin i holds (-(i+1)/8, -i/8].
    lp_edges = [-(i + 1) * LOGPROB_BIN_WIDTH for i in range(LOGPROB_BINS)]
    layer_keys = sorted((k for k in merged if k.isdigit()), key=int)
    attn_keys = sorted(
        (k for k in merged if k.startswith(ATTN_PREFIX)), key=lambda k: int(k[len(ATTN_PREFIX) :])
    )

    def entry_of(key: str, layer: int, site: str) -> dict[str, Any]:
        p = merged[key]
        entry = {"layer": layer, "site": site, **_summarize(p, lookahead)}
        entry["target_logprob_quantiles"] = _quantiles(p["logprob_hist"][::-1], lp_edges[::-1])
        entry["rank_histogram_log2"] = p["rank_hist"]
        for kind in GROUP_KINDS:
            groups = p.get(f"by_{kind}", {})
            entry[f"by_{kind}"] = {
                g: _summarize(groups[g], lookahead) for g in _ordered(groups, kind)
            }
        return entry

    summary: dict[str, Any] = {
        "quantile_method": "lower edge of the histogram bin holding the quantile "
        "(ranks: log2 bins; log-probs: 1/8-nat bins)",
        "categories": list(CATEGORIES),
        "position_buckets": "log2 buckets: 0, 1, 2-3, 4-7, ... of the token's position in its "
        "document (by_position) and of its byte offset from its line's start (by_column)",
        "copy_groups": "by_seen: the target occurs earlier in its document (seen) or not "
        "(novel); by_freq_bucket: floor(log2(the target's count over the corpus's ok documents)); "
        "by_line_repeat: the token's line repeats an earlier line of its document, leading "
        "whitespace ignored (repeated) or not (not_repeated)",
        "layers": [entry_of(k, int(k), "block") for k in layer_keys],
        "attn_layers": [entry_of(k, int(k[len(ATTN_PREFIX) :]), "attn") for k in attn_keys],
    }
    conv = merged.get(CONVERGENCE_KEY)
    if conv is not None:
        conv_layers = sorted({int(k) for k in layer_keys} | {int(k) for k in conv["all"]})
        summary["convergence"] = {
            "definition": CONVERGENCE_DEFINITION,
            "layers": conv_layers,
            "undefined_tokens": conv.get("undefined", 0),
            "overall": _convergence_summary(conv["all"], conv_layers),
            **{
                f"by_{kind}": {
                    g: _convergence_summary(conv.get(f"by_{kind}", {})[g], conv_layers)
                    for g in _ordered(conv.get(f"by_{kind}", {}), kind)
                }
                for kind in GROUP_KINDS
            },
        }
    return summary
