"""The row contract: the Arrow schemas of the lens part files and of ``docs.parquet``.

Every writer (the runner, the notebook API) builds its tables against these schemas, and every
reader (reports, DuckDB, Polars) can rely on them: column names, types and dictionary orders are
the same in every part file of every run of the same job.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

CATEGORY_TYPE = pa.dictionary(pa.int8(), pa.string())
"""Type of the ``category`` column: every part file uses the same dictionary, ``syntax.CATEGORIES``
in order, so a category's int8 index is the same in every file."""


SITES: tuple[str, ...] = ("block", "attn")
"""Values of the ``site`` column, in dictionary order."""
SITE_TYPE = pa.dictionary(pa.int8(), pa.string())
"""Type of the ``site`` column (dictionary ``SITES`` in every part file)."""


def lens_schema(
    k: int,
    n_ahead: int,
    set_names: Sequence[str],
    *,
    entropy: bool,
    kl_final: bool,
    router_k: int = 0,
    extra_fields: Sequence[pa.Field] = (),
) -> pa.Schema:
    """The Arrow schema of a lens part file for one job (columns switched off are absent).

    ``router_k > 0`` (``lens.router_topk``) adds ``router_topk``: the ``router_k`` experts the
    row's block chose for its token, null where no router applies.
    """
    fields = [
        pa.field("doc", pa.int32(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("site", SITE_TYPE, nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("target_id", pa.int32(), nullable=False),
        # Copying and frequency (codelens.engine.data.repeats): the target already occurs earlier
        # in the document (null: no target), floor(log2(its corpus count)) (-1: no target).
        pa.field("target_seen", pa.bool_()),
        pa.field("target_freq_bucket", pa.int8(), nullable=False),
        # Where the token is in its source (codelens.engine.data.syntax); null only for windows
        # planned without spans (hand-made WindowTasks).
        pa.field("line", pa.int32()),
        pa.field("byte_start", pa.int32()),
        pa.field("byte_end", pa.int32()),
        pa.field("category", CATEGORY_TYPE),
        # The token's line repeats an earlier line of the document (leading whitespace ignored).
        pa.field("line_repeat", pa.bool_()),
        pa.field("lse", pa.float32()),
    ]
    if entropy:
        fields.append(pa.field("entropy", pa.float32()))
    fields += [pa.field("target_logprob", pa.float32()), pa.field("target_rank", pa.int32())]
    if kl_final:
        fields.append(pa.field("kl_final", pa.float32()))
    fields += [
        pa.field("topk_ids", pa.list_(pa.int32(), k)),
        pa.field("topk_logprobs", pa.list_(pa.float32(), k)),
    ]
    if n_ahead:
        fields += [
            pa.field("ahead_logprob", pa.list_(pa.float32(), n_ahead)),
            pa.field("ahead_rank", pa.list_(pa.int32(), n_ahead)),
        ]
    fields += [pa.field(f"set_{name}", pa.float32()) for name in set_names]
    fields.append(pa.field("residual_finite", pa.bool_(), nullable=False))
    if router_k:
        fields.append(pa.field("router_topk", pa.list_(pa.int16(), router_k)))
    fields += list(extra_fields)
    return pa.schema(fields)


DOCS_SCHEMA = pa.schema(
    [
        pa.field("doc", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("language", pa.string()),
    ]
)
