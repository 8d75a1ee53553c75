"""Corpus aggregates per layer, built from mergeable per-shard partials.

Each shard contributes sums and histograms (never means or quantiles, which do not merge); the
run's ``summary.json`` is a pure function of the committed shards' partials, so it does not depend
on which worker ran which shard, or in which order.

Quantiles come from histograms: target ranks in log2 bins (bin 0 holds rank 0, bin b >= 1 ranks
``[2^(b-1), 2^b)``), target log-probs in bins of 1/8 nat down to -64. A quantile is reported as the
lower edge of the bin that holds it (exact for ranks 0 and 1; within 1/8 nat for log-probs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

RANK_BINS = 33
LOGPROB_BIN_WIDTH = 0.125
LOGPROB_BINS = 512  # [-64, 0] in steps of 1/8 nat; lower values fall in the last bin
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_SUM_KEYS = ("sum_logprob", "sum_entropy", "sum_kl", "top1_correct", "top1_agree_final", "top10")


def rank_bin(rank: Tensor) -> Tensor:
    """log2 bin of non-negative integer ranks: 0 -> 0, [2^(b-1), 2^b) -> b."""
    r = rank.to(torch.float64)
    bins = torch.where(r < 1, 0.0, torch.floor(torch.log2(r.clamp_min(1))) + 1)
    return bins.clamp(0, RANK_BINS - 1).long()


def logprob_bin(logprob: Tensor) -> Tensor:
    """Bin index of log-probs (<= 0): bin i holds ``(-(i+1)/8, -i/8]``."""
    idx = torch.floor((-logprob.to(torch.float64)) / LOGPROB_BIN_WIDTH)
    return idx.clamp(0, LOGPROB_BINS - 1).long()


def empty_layer_partial(n_ahead: int, set_names: Sequence[str]) -> dict[str, Any]:
    """A zero partial for one layer."""
    return {
        "rows": 0,
        "nonfinite": 0,
        "count": 0,
        **{key: 0.0 for key in _SUM_KEYS},
        "rank_hist": [0] * RANK_BINS,
        "logprob_hist": [0] * LOGPROB_BINS,
        "ahead_count": [0] * n_ahead,
        "ahead_top1": [0] * n_ahead,
        "ahead_sum_logprob": [0.0] * n_ahead,
        "set_sum_mass": {name: 0.0 for name in set_names},
    }


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
) -> dict[str, Any]:
    """Partial aggregates of one layer over T rows (all tensors ``[T]`` or ``[T, A|S]``, CPU)."""
    has = (target_id >= 0) & finite
    part = empty_layer_partial(ahead_logprob.shape[-1], set_names)
    part["rows"] = int(target_id.numel())
    part["nonfinite"] = int((~finite).sum())
    part["count"] = int(has.sum())
    lp = target_logprob[has].double()
    part["sum_logprob"] = float(lp.sum())
    if entropy is not None:
        part["sum_entropy"] = float(entropy[finite].double().sum())
    if kl_final is not None:
        part["sum_kl"] = float(kl_final[finite].double().sum())
    part["top1_correct"] = int((top1[has] == target_id[has]).sum())
    part["top10"] = int((target_rank[has] < 10).sum())
    part["top1_agree_final"] = int((top1[finite] == final_top1[finite]).sum())
    part["rank_hist"] = torch.bincount(rank_bin(target_rank[has]), minlength=RANK_BINS).tolist()
    part["logprob_hist"] = torch.bincount(logprob_bin(lp), minlength=LOGPROB_BINS).tolist()
    for a in range(ahead_logprob.shape[-1]):
        ok = (ahead_rank[:, a] >= 0) & finite
        part["ahead_count"][a] = int(ok.sum())
        part["ahead_top1"][a] = int((ahead_rank[ok, a] == 0).sum())
        part["ahead_sum_logprob"][a] = float(ahead_logprob[ok, a].double().sum())
    for j, name in enumerate(set_names):
        part["set_sum_mass"][name] = float(set_logmass[finite, j].double().exp().sum())
    return part


def merge_partials(partials: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum per-layer partials (keys are layer numbers as strings, as stored in JSON)."""
    merged: dict[str, dict[str, Any]] = {}
    for shard in partials:
        for layer, part in shard.items():
            if layer not in merged:
                merged[layer] = _copy(part)
                continue
            acc = merged[layer]
            for key, value in part.items():
                if isinstance(value, list):
                    acc[key] = [x + y for x, y in zip(acc[key], value, strict=True)]
                elif isinstance(value, dict):
                    acc[key] = {n: acc[key][n] + value[n] for n in value}
                else:
                    acc[key] = acc[key] + value
    return merged


def _copy(part: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in part.items()}


def _quantiles(hist: Sequence[int], edges: Sequence[float]) -> dict[str, float | None]:
    total = sum(hist)
    if total == 0:
        return {f"p{round(q * 100)}": None for q in QUANTILES}
    cum = np.cumsum(hist)
    return {f"p{round(q * 100)}": edges[int(np.searchsorted(cum, q * total))] for q in QUANTILES}


def _div(x: float, n: int) -> float | None:
    return x / n if n else None


def finalize(merged: dict[str, dict[str, Any]], lookahead: Sequence[int]) -> dict[str, Any]:
    """Turn merged partials into the per-layer summary written to summary.json."""
    rank_edges = [0] + [2 ** (b - 1) for b in range(1, RANK_BINS)]
    # Lower edge of the log-prob bin: bin i holds (-(i+1)/8, -i/8].
    lp_edges = [-(i + 1) * LOGPROB_BIN_WIDTH for i in range(LOGPROB_BINS)]
    layers = []
    for layer in sorted(merged, key=int):
        p = merged[layer]
        n, rows = p["count"], p["rows"] - p["nonfinite"]
        layers.append(
            {
                "layer": int(layer),
                "rows": p["rows"],
                "nonfinite_rows": p["nonfinite"],
                "count": n,
                "mean_target_logprob": _div(p["sum_logprob"], n),
                "target_logprob_quantiles": _quantiles(p["logprob_hist"][::-1], lp_edges[::-1]),
                "target_rank_quantiles": _quantiles(p["rank_hist"], rank_edges),
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
                "rank_histogram_log2": p["rank_hist"],
            }
        )
    return {
        "quantile_method": "lower edge of the histogram bin holding the quantile "
        "(ranks: log2 bins; log-probs: 1/8-nat bins)",
        "layers": layers,
    }

