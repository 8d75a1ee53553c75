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
their own layer partials keyed ``attn:<layer>`` (finalized into ``attn_layers``). Merging adds numbers, adds lists element-wise and takes the union of
dict keys (a language seen in one shard only is simply carried over).

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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from codelens.engine.data.syntax import CATEGORIES

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
GROUP_KINDS = ("category", "language", "position", "column")
"""Groupings of summary.json: syntax category, document language, and the log2 buckets of the
token's position in its document and of its byte column within its line."""
N_POSITION_BUCKETS = 32


def bucket_names() -> list[str]:
    """Names of the log2 position buckets: ``0``, ``1``, ``2-3``, ``4-7``, ..."""
    return ["0", "1"] + [f"{2 ** (b - 1)}-{2**b - 1}" for b in range(2, N_POSITION_BUCKETS)]


def position_bucket(values: np.ndarray) -> np.ndarray:
    """log2 bucket of non-negative integers (0 -> 0, 1 -> 1, [2^(b-1), 2^b) -> b); -1 stays -1."""
    v = np.asarray(values, dtype=np.int64)
    b = np.where(v < 1, 0, np.floor(np.log2(np.maximum(v, 1))).astype(np.int64) + 1)
    return np.where(v < 0, -1, np.minimum(b, N_POSITION_BUCKETS - 1)).astype(np.int64)


GroupIds = Mapping[str, tuple[Tensor, Sequence[str]]]
"""Groupings of a shard's tokens: kind (``category``, ``language``) -> ``(ids [T], names)``;
``ids[i]`` indexes ``names``; a negative id leaves the token out of that grouping."""


def _rank_bin(rank: np.ndarray) -> np.ndarray:
    r = rank.astype(np.float64)
    bins = np.where(r < 1, 0.0, np.floor(np.log2(np.maximum(r, 1))) + 1)
    return np.clip(bins, 0, RANK_BINS - 1).astype(np.int64)


def _logprob_bin(logprob: np.ndarray) -> np.ndarray:
    idx = np.floor(-np.nan_to_num(logprob.astype(np.float64), nan=0.0) / LOGPROB_BIN_WIDTH)
    return np.clip(idx, 0, LOGPROB_BINS - 1).astype(np.int64)


def _np(x: Tensor | np.ndarray | None) -> np.ndarray | None:
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def group_partials(
    group: Tensor | np.ndarray,
    n_groups: int,
    *,
    target_logprob: Tensor,
    target_rank: Tensor,
    top1: Tensor,
    final_top1: Tensor,
    target_id: Tensor,
    finite: Tensor,
    entropy: Tensor | None,
    kl_final: Tensor | None,
    ahead_logprob: Tensor,
    ahead_rank: Tensor,
    set_logmass: Tensor,
    set_names: Sequence[str],
    logprob_hist: bool = False,
) -> list[dict[str, Any]]:
    """Partial aggregates of one layer's rows, per group (one ``bincount`` per statistic).

    Args:
        group: ``[T]`` group index of each row in ``0 .. n_groups - 1``; rows with a negative
            index are left out.
        n_groups: number of groups.
        target_logprob, target_rank, top1, final_top1, target_id, finite, entropy, kl_final:
            ``[T]`` per-row values (CPU); ``entropy``/``kl_final`` None when not computed.
        ahead_logprob, ahead_rank: ``[T, A]``.
        set_logmass: ``[T, S]``.
        set_names: the ``S`` token-set names.
        logprob_hist: also histogram the target log-probs (512 bins; overall rows only).

    Returns:
        One partial per group, with the keys ``rows``, ``nonfinite``, ``count``,
        ``sum_logprob``, ``sum_entropy``/``sum_kl`` (None when not computed), ``top1_correct``,
        ``top1_agree_final``, ``top10``, ``rank_hist`` (``RANK_BINS``), ``logprob_hist``
        (``LOGPROB_BINS``), ``ahead_count``/``ahead_top1``/``ahead_sum_logprob`` (one per
        look-ahead offset) and ``set_sum_mass`` (token-set name -> sum of masses).
    """
    # numpy, not torch: these are tiny sequential reductions, and torch's thread pool makes each
    # one ~100x slower on a busy CPU. np.bincount sums float64 weights in index order, so the
    # result is deterministic (a Ray worker computes the same numbers as the local one).
    group, target_logprob, target_rank = _np(group), _np(target_logprob), _np(target_rank)
    top1, final_top1, target_id, finite = _np(top1), _np(final_top1), _np(target_id), _np(finite)
    entropy, kl_final, ahead_logprob = _np(entropy), _np(kl_final), _np(ahead_logprob)
    ahead_rank, set_logmass = _np(ahead_rank), _np(set_logmass)
    valid = group >= 0
    g = np.maximum(group, 0).astype(np.int64)
    has = (target_id >= 0) & finite & valid
    ok_rows = finite & valid

    def count(mask: np.ndarray) -> list[int]:
        return np.bincount(g[mask], minlength=n_groups).tolist()

    def total(mask: np.ndarray, values: np.ndarray) -> list[float]:
        weights = values[mask].astype(np.float64)
        return np.bincount(g[mask], weights=weights, minlength=n_groups).tolist()

    def hist(mask: np.ndarray, bins: np.ndarray, n_bins: int) -> list[list[int]]:
        flat = np.bincount(g[mask] * n_bins + bins[mask], minlength=n_groups * n_bins)
        return flat.reshape(n_groups, n_bins).tolist()

    rows = count(valid)
    nonfinite = count(~finite & valid)
    n_has = count(has)
    sum_lp = total(has, target_logprob)
    sum_ent = total(ok_rows, entropy) if entropy is not None else None
    sum_kl = total(ok_rows, kl_final) if kl_final is not None else None
    correct = count(has & (top1 == target_id))
    top10 = count(has & (target_rank < 10))
    agree = count(ok_rows & (top1 == final_top1))
    rank_h = hist(has, _rank_bin(target_rank), RANK_BINS)
    lp_h = hist(has, _logprob_bin(target_logprob), LOGPROB_BINS) if logprob_hist else None
    n_ahead = ahead_logprob.shape[-1]
    ahead = []
    for a in range(n_ahead):
        ok = (ahead_rank[:, a] >= 0) & ok_rows
        top1_ahead = count(ok & (ahead_rank[:, a] == 0))
        ahead.append((count(ok), top1_ahead, total(ok, ahead_logprob[:, a])))
    masses = {
        name: total(ok_rows, np.exp(set_logmass[:, j].astype(np.float64)))
        for j, name in enumerate(set_names)
    }

    out = []
    for i in range(n_groups):
        part = {
            "rows": rows[i],
            "nonfinite": nonfinite[i],
            "count": n_has[i],
            "sum_logprob": sum_lp[i],
            "sum_entropy": None if sum_ent is None else sum_ent[i],
            "sum_kl": None if sum_kl is None else sum_kl[i],
            "top1_correct": correct[i],
            "top1_agree_final": agree[i],
            "top10": top10[i],
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
    *,
    layers: Sequence[int],
    target_logprob: Tensor,
    target_rank: Tensor,
    top1: Tensor,
    final_top1: Tensor,
    target_id: Tensor,
    finite: Tensor,
    entropy: Tensor | None,
    kl_final: Tensor | None,
    ahead_logprob: Tensor,
    ahead_rank: Tensor,
    set_logmass: Tensor,
    set_names: Sequence[str],
    groups: GroupIds | None = None,
) -> dict[str, dict[str, Any]]:
    """Partial aggregates of several layers over the same T tokens, in one pass per grouping.

    Args:
        layers: the ``n`` layer numbers (the partials' keys).
        target_logprob, target_rank, top1, finite, entropy, kl_final: ``[n, T]`` (CPU).
        ahead_logprob, ahead_rank: ``[n, T, A]``; set_logmass: ``[n, T, S]``.
        final_top1, target_id: ``[T]``.
        set_names: the ``S`` token-set names.
        groups: optional groupings of the T tokens (``{"category": (ids, names), ...}``); each
            adds a ``by_<kind>`` dict of the groups' partials (only groups with rows).

    Returns:
        ``{"<layer>": partial}``.
    """
    n, t = target_logprob.shape
    # Rows of all layers in one flat batch, grouped by (layer, group): one bincount per statistic
    # for the whole shard instead of one per layer and group (what matters for 60-layer models).
    slot = np.repeat(np.arange(n, dtype=np.int64), t)

    def flat(x: Tensor | np.ndarray | None) -> np.ndarray | None:
        x = _np(x)
        return None if x is None else x.reshape(n * t, *x.shape[2:])

    stats = dict(
        target_logprob=flat(target_logprob),
        target_rank=flat(target_rank),
        top1=flat(top1),
        final_top1=np.tile(_np(final_top1), n),
        target_id=np.tile(_np(target_id), n),
        finite=flat(finite),
        entropy=flat(entropy),
        kl_final=flat(kl_final),
        ahead_logprob=flat(ahead_logprob),
        ahead_rank=flat(ahead_rank),
        set_logmass=flat(set_logmass),
        set_names=set_names,
    )
    overall = group_partials(slot, n, logprob_hist=True, **stats)
    out = {str(layer): overall[i] for i, layer in enumerate(layers)}
    for kind, (ids, names) in (groups or {}).items():
        g = len(names)
        tiled = np.tile(_np(ids).astype(np.int64), n)
        parts = group_partials(np.where(tiled >= 0, slot * g + tiled, -1), n * g, **stats)
        for i, layer in enumerate(layers):
            mine = parts[i * g : (i + 1) * g]
            out[str(layer)][f"by_{kind}"] = {
                name: p for name, p in zip(names, mine, strict=True) if p["rows"]
            }
    return out


def layer_partial(
    *,
    target_logprob: Tensor,
    target_rank: Tensor,
    top1: Tensor,
    final_top1: Tensor,
    target_id: Tensor,
    finite: Tensor,
    entropy: Tensor | None,
    kl_final: Tensor | None,
    ahead_logprob: Tensor,
    ahead_rank: Tensor,
    set_logmass: Tensor,
    set_names: Sequence[str],
    groups: GroupIds | None = None,
) -> dict[str, Any]:
    """Partial aggregates of one layer over T rows (tensors ``[T]`` or ``[T, A|S]``, CPU).

    The one-layer case of :func:`layer_partials` (same arguments without the layer dimension).
    """

    def one(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.unsqueeze(0)

    return layer_partials(
        layers=[0],
        target_logprob=one(target_logprob),
        target_rank=one(target_rank),
        top1=one(top1),
        final_top1=final_top1,
        target_id=target_id,
        finite=one(finite),
        entropy=one(entropy),
        kl_final=one(kl_final),
        ahead_logprob=one(ahead_logprob),
        ahead_rank=one(ahead_rank),
        set_logmass=one(set_logmass),
        set_names=set_names,
        groups=groups,
    )["0"]


def convergence_layers(
    top1: Tensor | np.ndarray, finite: Tensor | np.ndarray, layers: Sequence[int]
) -> np.ndarray:
    """Each token's convergence layer (see the module docstring).

    Args:
        top1: ``[C, T]`` top-1 ids at the captured layers, the final layer last.
        finite: ``[C, T]`` whether each row's residual was finite.
        layers: the ``C`` captured layer numbers, ascending.

    Returns:
        ``[T]`` int64 layer numbers; -1 where undefined (final-layer row not finite).
    """
    top1, finite = _np(top1), _np(finite)
    agree = (top1 == top1[-1]) & finite
    # stays[c, i]: the token agrees with the final top-1 at every captured layer from c on.
    stays = np.logical_and.accumulate(agree[::-1], axis=0)[::-1]
    first = stays.argmax(axis=0)  # the first True (the final row always agrees when finite)
    conv = np.asarray(layers, dtype=np.int64)[first]
    return np.where(finite[-1], conv, -1)


def convergence_partial(
    conv: Tensor | np.ndarray, layers: Sequence[int], groups: GroupIds | None = None
) -> dict[str, Any]:
    """Histograms of convergence layers: overall and per group (only groups with tokens).

    Args:
        conv: ``[T]`` from :func:`convergence_layers`.
        layers: the captured layer numbers (every one gets a bin, zeros included).
        groups: as in :func:`layer_partial`.

    Returns:
        ``{"all": {"<layer>": n}, "by_<kind>": {name: {"<layer>": n}}, "undefined": n}``.
    """
    slot = {layer: i for i, layer in enumerate(layers)}
    lut = np.full(max(layers) + 1, -1, dtype=np.int64)
    for layer, i in slot.items():
        lut[layer] = i
    conv = _np(conv).astype(np.int64)
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
        ids = _np(ids).astype(np.int64)
        ok = defined & (ids >= 0)
        flat = np.bincount(ids[ok] * n + s[ok], minlength=len(names) * n).reshape(len(names), n)
        out[f"by_{kind}"] = {
            name: as_dict(row) for name, row in zip(names, flat.tolist(), strict=True) if sum(row)
        }
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
    """Categories in ``CATEGORIES`` order, position buckets ascending, languages alphabetically."""
    if kind == "category":
        return [c for c in CATEGORIES if c in groups] + sorted(set(groups) - set(CATEGORIES))
    if kind in ("position", "column"):
        return sorted(groups, key=lambda name: int(name.split("-")[0]))
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
