"""Arrow rows of a batch of windows: the lens part-file table (``row_schema.lens_schema``).

Rows are layer-major: all tokens of the first written row kind (``ResolvedLens.rows``), in window
order, then the next kind, and so on. Columns are built as ``[n_rows_kinds, T, ...]`` arrays and
flattened once, so no Python loop runs per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from codelens.engine.data.syntax import CATEGORIES
from codelens.engine.row_schema import SITES, lens_schema
from codelens.engine.run.pipeline import LensBatch
from codelens.engine.run.request import BLOCK_SITE, ResolvedLens

SPAN_COLUMNS = ("line", "byte_start", "byte_end", "category")
"""Source coordinates planned with each window (``WindowTask.spans``); null without spans."""


def lens_table_schema(lens: ResolvedLens) -> pa.Schema:
    """The part-file schema of a job's lens request."""
    spec = lens.spec
    return lens_schema(
        spec.k,
        len(spec.lookahead),
        lens.set_names,
        entropy=spec.entropy,
        kl_final=spec.kl_final,
        router_k=lens.router_k,
    )


def _span_column(batch: LensBatch, name: str) -> np.ndarray:
    """``[T]`` one span column of the batch's tokens; -1 for windows planned without spans."""
    dtype = np.int8 if name == "category" else np.int32
    return np.concatenate(
        [
            np.full(w.n_emit, -1, dtype)
            if w.spans is None
            else getattr(w.spans, name).astype(dtype)
            for w in batch.inputs
        ]
    )


COPY_COLUMNS = ("target_seen", "target_freq_bucket", "line_repeat")
"""Copying features planned with each window (``WindowTask.copy``); -1 is null (bucket: -1)."""


def _copy_column(batch: LensBatch, name: str) -> np.ndarray:
    """``[T]`` int8 one copying column of the batch's tokens; -1 for windows planned without."""
    return np.concatenate(
        [
            np.full(w.n_emit, -1, np.int8) if w.copy is None else getattr(w.copy, name)
            for w in batch.inputs
        ]
    )


def _columns(lens: ResolvedLens, batch: LensBatch) -> dict[str, np.ndarray]:
    """Every column as an ``[n_kinds, T, ...]`` array (per-token values broadcast over kinds)."""
    slots = [slot for _, _, slot in lens.rows]
    n_kinds, n_tok = len(slots), batch.token_ids.shape[0]
    stats = batch.stats

    def per_token(value: np.ndarray) -> np.ndarray:
        return np.broadcast_to(value, (n_kinds, n_tok))

    def per_kind(value: list[int], dtype) -> np.ndarray:
        return np.broadcast_to(np.array(value, dtype)[:, None], (n_kinds, n_tok))

    doc = np.concatenate([np.full(w.n_emit, w.doc, np.int32) for w in batch.inputs])
    pos = np.concatenate(
        [np.arange(w.first_pos, w.first_pos + w.n_emit, dtype=np.int32) for w in batch.inputs]
    )
    columns = {
        "doc": per_token(doc),
        "pos": per_token(pos),
        "layer": per_kind([layer for _, layer, _ in lens.rows], np.int16),
        "site": per_kind([site for site, _, _ in lens.rows], np.int8),
        "token_id": per_token(batch.token_ids.numpy().astype(np.int32)),
        "target_id": per_token(batch.targets[:, 0].numpy().astype(np.int32)),
    }
    for name in SPAN_COLUMNS:
        columns[name] = per_token(_span_column(batch, name))
    for name in COPY_COLUMNS:
        columns[name] = per_token(_copy_column(batch, name))
    columns["lse"] = stats.lse[slots].numpy()
    if stats.entropy is not None:
        columns["entropy"] = stats.entropy[slots].numpy()
    columns["target_logprob"] = stats.target_logprob[slots].numpy()
    columns["target_rank"] = stats.target_rank[slots].numpy()
    if stats.kl_final is not None:
        columns["kl_final"] = stats.kl_final[slots].numpy()
    columns["topk_ids"] = stats.topk_ids[slots].numpy()
    columns["topk_logprobs"] = stats.topk_logprobs[slots].numpy()
    if lens.spec.lookahead:
        columns["ahead_logprob"] = stats.ahead_logprob[slots].numpy()
        columns["ahead_rank"] = stats.ahead_rank[slots].numpy()
    for j, name in enumerate(lens.set_names):
        columns[f"set_{name}"] = stats.set_logmass[slots, :, j].numpy()
    columns["residual_finite"] = stats.finite[slots].numpy()
    if batch.routed is not None:
        columns["router_topk"] = _router_column(lens, batch)
    return columns


def _router_column(lens: ResolvedLens, batch: LensBatch) -> np.ndarray:
    """``[n_kinds, T, k]`` the experts of each row's block; -1 (null) on layer 0, dense blocks
    and attn rows (the router reads the post-attention residual: its choice is the block's)."""
    routed = batch.routed.numpy()  # [L, T, k]
    none = np.full(routed.shape[1:], -1, np.int16)
    return np.stack(
        [
            routed[layer - 1] if site == BLOCK_SITE and layer >= 1 else none
            for site, layer, _ in lens.rows
        ]
    )


def lens_table(lens: ResolvedLens, batch: LensBatch) -> pa.Table:
    """The batch's rows as a table of ``lens_table_schema(lens)``, layer-major.

    ``batch.inputs`` must be windows (``doc``, ``first_pos`` and optionally ``spans``), as the
    planner makes them.
    """
    schema = lens_table_schema(lens)
    columns = _columns(lens, batch)
    arrays = []
    for field in schema:
        flat = np.ascontiguousarray(columns[field.name]).reshape(-1)
        if pa.types.is_dictionary(field.type):
            # -1 marks a token planned without spans: a null category.
            indices = pa.array(flat, type=field.type.index_type, mask=flat < 0)
            names = pa.array(SITES if field.name == "site" else CATEGORIES, pa.string())
            arrays.append(pa.DictionaryArray.from_arrays(indices, names))
        elif field.name in SPAN_COLUMNS:
            arrays.append(pa.array(flat, type=field.type, mask=flat < 0))
        elif pa.types.is_boolean(field.type) and field.name in COPY_COLUMNS:
            arrays.append(pa.array(flat > 0, type=field.type, mask=flat < 0))
        elif field.name == "router_topk":
            k = field.type.list_size
            values = pa.array(flat, type=field.type.value_type)
            null = flat.reshape(-1, k)[:, 0] < 0  # a dense block, layer 0 or an attn row
            arrays.append(pa.FixedSizeListArray.from_arrays(values, k, mask=pa.array(null)))
        elif pa.types.is_fixed_size_list(field.type):
            values = pa.array(flat, type=field.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(values, field.type.list_size))
        else:
            arrays.append(pa.array(flat, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
