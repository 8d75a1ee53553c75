"""Run the lens over a shard: batched forward passes with capture, lens statistics, Arrow rows.

``LensRunner`` is device- and executor-agnostic: the local executor and Ray actors both hold one
(inside the worker) and call ``run_shard`` with a planned ``Shard`` of ``WindowTask``s.

Per batch of windows (right-padded to the longest, at most ``batch_tokens`` ids):

    ids [B, S] --forward + hooks--> residual [n_captured, B*S, d]
        --keep the emitted positions--> hidden [n_captured, T, d]
        --lens_stats--> per-row statistics --> rows for the selected layers

Each row also carries where its token is in the source (``line``, ``byte_start``, ``byte_end``,
syntax ``category``): planned with the window (``WindowTask.spans``, ``codelens.engine.data.syntax``), so
a worker never re-tokenizes or re-lexes. The shard's partial aggregates (``codelens.engine.run.aggregates``)
are grouped by those categories and by the documents' languages, and hold each token's convergence
layer, computed here across the captured layers.

The final layer L is always captured (it is the reference for ``kl_final`` and for the top-1
agreement aggregate) even when ``lens.layers`` leaves it out of the written rows.

Lens variants (``lens.sites``, ``lens.decoder_blocks``): the ``attn`` site adds, for each selected
layer l >= 1, the residual stream inside block l right after attention (captured as the input of
the block's pre-MLP norm, ``model_surgery.attn_residual_modules``); its rows carry ``site = attn``
and are statistics like any other (KL against the final *block* layer L). With
``decoder_blocks = n``, the forward pass also records the (args, kwargs) each of the last n blocks
receives (masks, positions, rotary embeddings); afterwards every captured residual before those
blocks (block layers l < L - n, attn layers l <= L - n) is run through them, as a full
``[B, S, d]`` sequence, before the head reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from codelens.engine.data.syntax import CATEGORIES
from codelens.engine.data.windows import Shard, WindowTask
from codelens.engine.errors import SpecError, UnsupportedArchitectureError
from codelens.engine.model.capture import ResidualCapture, _first_tensor
from codelens.engine.model.surgery import attn_residual_modules
from codelens.engine.run.aggregates import (
    ATTN_PREFIX,
    CONVERGENCE_KEY,
    UNKNOWN_LANGUAGE,
    GroupIds,
    bucket_names,
    convergence_layers,
    convergence_partial,
    layer_partials,
    position_bucket,
)
from codelens.engine.run.rundir import SITES, lens_schema
from codelens.engine.schemas import JobSpec
from codelens.kernels import LensImpl, LensRequest, LensStats, lens_stats, resolve_impl


def resolve_layers(spec_layers: str | Sequence[int], n_blocks: int) -> list[int]:
    """Layer indices to write, validated against the model (raises SpecError)."""
    if spec_layers == "all":
        return list(range(n_blocks + 1))
    bad = [layer for layer in spec_layers if layer > n_blocks]
    if bad:
        raise SpecError(
            f"lens.layers: index {bad[0]} is out of range: this model has layers 0..{n_blocks} "
            f"(0 = embeddings, {n_blocks} = last block); use 'all' or indices in that range"
        )
    return list(spec_layers)


def resolve_token_sets(
    token_sets: dict[str, list[str | int]], tokenizer, vocab_size: int
) -> tuple[tuple[str, Tensor], ...]:
    """Token-set entries to ids: a string counts the first token of its encoding (no specials)."""
    resolved = []
    for name, entries in token_sets.items():
        ids: list[int] = []
        for entry in entries:
            if isinstance(entry, int):
                if not 0 <= entry < vocab_size:
                    raise SpecError(
                        f"lens.token_sets.{name}: id {entry} is outside the vocabulary [0, {vocab_size})"
                    )
                ids.append(entry)
            else:
                encoded = tokenizer.encode(entry, add_special_tokens=False)
                if not encoded:
                    raise SpecError(f"lens.token_sets.{name}: {entry!r} encodes to no tokens")
                ids.append(encoded[0])
        resolved.append((name, torch.tensor(sorted(set(ids)), dtype=torch.long)))
    return tuple(resolved)


class LensRunner:
    """Runs shards of a job through one loaded model.

    Args:
        spec: the validated job.
        model: the HF causal LM (eval mode, on its device).
        tokenizer: its tokenizer (for token sets and padding).
        blocks: the decoder blocks (from model surgery).
        head: the model's read-out path (from model surgery).
    """

    def __init__(self, spec: JobSpec, model, tokenizer, blocks, head) -> None:
        self.spec = spec
        self.model = model
        self.head = head
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        n_blocks = len(blocks)
        self.n_blocks = n_blocks
        self.blocks = list(blocks)
        self.layers = resolve_layers(spec.lens.layers, n_blocks)
        # Block layers are captured whatever the sites (the convergence layer is defined over them).
        self.captured = sorted(set(self.layers) | {n_blocks})
        sites = spec.lens.sites
        self.attn_layers = [layer for layer in self.layers if layer >= 1] if "attn" in sites else []
        attn_modules = None
        if "attn" in sites:
            try:
                attn_modules = attn_residual_modules(model)
            except UnsupportedArchitectureError as e:
                raise SpecError(f"lens.sites: attn: {e}") from None
        self.capture = ResidualCapture(
            blocks, self.captured, attn_modules=attn_modules, attn_layers=self.attn_layers
        )
        n_cap = len(self.captured)
        self.final_slot = n_cap - 1
        # Written rows, in order: (site index in SITES, layer, buffer slot).
        block_rows = [(0, layer, self.captured.index(layer)) for layer in self.layers]
        attn_rows = [(1, layer, n_cap + i) for i, layer in enumerate(self.attn_layers)]
        self.rows = (block_rows if "block" in sites else []) + attn_rows
        self.decoder_blocks = spec.lens.decoder_blocks
        if self.decoder_blocks >= n_blocks:
            raise SpecError(
                f"lens.decoder_blocks={self.decoder_blocks} must be smaller than the model's "
                f"{n_blocks} blocks (0 switches the variant off)"
            )
        start = n_blocks - self.decoder_blocks
        self.decoded_slots = (
            []
            if not self.decoder_blocks
            else [i for i, layer in enumerate(self.captured) if layer < start]
            + [n_cap + i for i, layer in enumerate(self.attn_layers) if layer <= start]
        )
        if spec.lens.k > head.vocab_size:
            raise SpecError(
                f"lens.k={spec.lens.k} is larger than the vocabulary ({head.vocab_size} rows); "
                f"choose k <= {head.vocab_size}"
            )
        token_sets = resolve_token_sets(spec.lens.token_sets, tokenizer, head.vocab_size)
        self.token_set_ids = {name: ids.tolist() for name, ids in token_sets}
        self.request = LensRequest(
            k=spec.lens.k,
            entropy=spec.lens.entropy,
            kl_final=spec.lens.kl_final,
            token_sets=tuple((name, ids.to(self.device)) for name, ids in token_sets),
        )
        try:
            self.impl = resolve_impl(LensImpl(spec.lens.impl), self.device)
        except RuntimeError as exc:  # kernels/ cannot raise our errors; the reason names the fix
            raise SpecError(str(exc)) from None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.set_names = [name for name, _ in token_sets]
        self.schema = lens_schema(
            spec.lens.k,
            len(spec.lens.lookahead),
            self.set_names,
            entropy=spec.lens.entropy,
            kl_final=spec.lens.kl_final,
        )

    # -- batching -------------------------------------------------------------------------------

    def batches(self, windows: Sequence[WindowTask]) -> list[list[WindowTask]]:
        """Group consecutive windows so that ``len(batch) * longest <= batch_tokens``."""
        budget = self.spec.execution.batch_tokens
        out: list[list[WindowTask]] = []
        current: list[WindowTask] = []
        longest = 0
        for w in windows:
            new_longest = max(longest, len(w.input_ids))
            if current and (len(current) + 1) * new_longest > budget:
                out.append(current)
                current, new_longest = [], len(w.input_ids)
            current.append(w)
            longest = new_longest
        if current:
            out.append(current)
        return out

    @torch.inference_mode()
    def forward_batch(self, batch: Sequence[WindowTask]) -> Tensor:
        """Residual rows of the emitted tokens: ``[n_captured, T, d]`` (T = emitted tokens)."""
        n, seq = len(batch), max(len(w.input_ids) for w in batch)
        ids = torch.full((n, seq), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, seq), dtype=torch.long)
        keep = []
        for b, w in enumerate(batch):
            length = len(w.input_ids)
            ids[b, :length] = torch.tensor(w.input_ids)
            mask[b, :length] = 1
            keep.append(torch.arange(b * seq + length - w.n_emit, b * seq + length))
        ids, mask = ids.to(self.device), mask.to(self.device)
        d = self.head.d_model
        calls: list[tuple[tuple, dict]] = []
        handles = []
        if self.decoded_slots:
            # Record what each of the last n blocks is called with (masks, positions, rotary).
            def record(module, args, kwargs):
                calls.append((args, kwargs))

            for block in self.blocks[self.n_blocks - self.decoder_blocks :]:
                handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
        try:
            with self.capture.recording(n, seq, d, self.dtype, self.device) as buffer:
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        for slot in self.decoded_slots:
            view = buffer[slot].view(n, seq, d)
            view.copy_(self._decode(view, calls))
        return buffer[:, torch.cat(keep).to(self.device)]

    def _decode(self, hidden: Tensor, calls: Sequence[tuple[tuple, dict]]) -> Tensor:
        """Run ``hidden [B, S, d]`` through the last n blocks, with their recorded arguments."""
        blocks = self.blocks[self.n_blocks - self.decoder_blocks :]
        if len(calls) != len(blocks):
            raise RuntimeError(
                f"lens.decoder_blocks: recorded {len(calls)} calls of the last {len(blocks)} blocks"
            )
        x = hidden
        for block, (args, kwargs) in zip(blocks, calls, strict=True):
            if args:
                out = block(x, *args[1:], **kwargs)
            else:
                out = block(**{**kwargs, "hidden_states": x})
            x = _first_tensor(out)
        return x

    # -- shards ---------------------------------------------------------------------------------

    def run_shard(self, task: Shard) -> tuple[pa.Table, dict[str, dict]]:
        """Rows (layer-major, then document order) and partial aggregates of a shard.

        Returns:
            The rows, and the partials of ``codelens.engine.run.aggregates``: one per written layer
            (overall, by syntax category, by language) and the convergence-layer histograms.
        """
        columns: dict[str, list[np.ndarray]] = {}
        partial_inputs: list[tuple[LensStats, Tensor, Tensor]] = []
        for batch in self.batches(task.windows):
            hidden = self.forward_batch(batch)
            targets = torch.from_numpy(np.concatenate([w.targets for w in batch])).long()
            stats, _ = lens_stats(
                hidden,
                self.head,
                targets.to(self.device),
                self.request,
                hidden[self.final_slot],
                impl=self.impl,
            )
            stats = stats.to("cpu")
            tokens = self._token_ids(batch)
            self._append_columns(columns, batch, stats, tokens, targets)
            partial_inputs.append((stats, targets, tokens))
        table = self._to_table(columns)
        # Batches are runs of consecutive windows, so the shard's token order is window order.
        return table, self._partials(partial_inputs, self._groups(task.windows))

    @staticmethod
    def _groups(windows: Sequence[WindowTask]) -> GroupIds:
        """Each emitted token's syntax category and language, as group ids for the partials."""
        category = np.concatenate(
            [
                np.full(w.n_emit, -1, np.int8) if w.spans is None else w.spans.category
                for w in windows
            ]
            or [np.zeros(0, np.int8)]
        )
        languages = sorted({w.language or UNKNOWN_LANGUAGE for w in windows})
        index = {name: i for i, name in enumerate(languages)}
        language = np.concatenate(
            [np.full(w.n_emit, index[w.language or UNKNOWN_LANGUAGE], np.int64) for w in windows]
            or [np.zeros(0, np.int64)]
        )
        pos = np.concatenate(
            [np.arange(w.first_pos, w.first_pos + w.n_emit) for w in windows]
            or [np.zeros(0, np.int64)]
        )
        column = np.concatenate(
            [
                np.full(w.n_emit, -1, np.int64)
                if w.spans is None or w.spans.column is None
                else w.spans.column.astype(np.int64)
                for w in windows
            ]
            or [np.zeros(0, np.int64)]
        )
        buckets = bucket_names()
        return {
            "category": (torch.from_numpy(category.astype(np.int64)), CATEGORIES),
            "language": (torch.from_numpy(language), languages),
            "position": (torch.from_numpy(position_bucket(pos)), buckets),
            "column": (torch.from_numpy(position_bucket(column)), buckets),
        }

    def _token_ids(self, batch: Sequence[WindowTask]) -> Tensor:
        return torch.tensor([i for w in batch for i in w.input_ids[len(w.input_ids) - w.n_emit :]])

    def _append_columns(
        self,
        columns: dict[str, list[np.ndarray]],
        batch: Sequence[WindowTask],
        stats: LensStats,
        tokens: Tensor,
        targets: Tensor,
    ) -> None:
        """Add this batch's rows for the selected layers as ``[n_layers, T, ...]`` arrays."""
        slots = [slot for _, _, slot in self.rows]
        n_tok = tokens.shape[0]
        doc = np.concatenate([np.full(w.n_emit, w.doc, np.int32) for w in batch])
        pos = np.concatenate(
            [np.arange(w.first_pos, w.first_pos + w.n_emit, dtype=np.int32) for w in batch]
        )
        n_sel = len(slots)

        def add(name: str, value: np.ndarray) -> None:
            columns.setdefault(name, []).append(value)

        add("doc", np.broadcast_to(doc, (n_sel, n_tok)))
        add("pos", np.broadcast_to(pos, (n_sel, n_tok)))
        add(
            "layer",
            np.broadcast_to(np.array([r[1] for r in self.rows], np.int16)[:, None], (n_sel, n_tok)),
        )
        add(
            "site",
            np.broadcast_to(np.array([r[0] for r in self.rows], np.int8)[:, None], (n_sel, n_tok)),
        )
        add("token_id", np.broadcast_to(tokens.numpy().astype(np.int32), (n_sel, n_tok)))
        add("target_id", np.broadcast_to(targets[:, 0].numpy().astype(np.int32), (n_sel, n_tok)))
        # -1 marks a token planned without spans; _to_table turns it into a null.
        for name in ("line", "byte_start", "byte_end", "category"):
            dtype = np.int8 if name == "category" else np.int32
            value = np.concatenate(
                [
                    np.full(w.n_emit, -1, dtype) if w.spans is None else getattr(w.spans, name)
                    for w in batch
                ]
            )
            add(name, np.broadcast_to(value.astype(dtype), (n_sel, n_tok)))
        add("lse", stats.lse[slots].numpy())
        if stats.entropy is not None:
            add("entropy", stats.entropy[slots].numpy())
        add("target_logprob", stats.target_logprob[slots].numpy())
        add("target_rank", stats.target_rank[slots].numpy())
        if stats.kl_final is not None:
            add("kl_final", stats.kl_final[slots].numpy())
        add("topk_ids", stats.topk_ids[slots].numpy())
        add("topk_logprobs", stats.topk_logprobs[slots].numpy())
        if self.spec.lens.lookahead:
            add("ahead_logprob", stats.ahead_logprob[slots].numpy())
            add("ahead_rank", stats.ahead_rank[slots].numpy())
        for j, name in enumerate(self.set_names):
            add(f"set_{name}", stats.set_logmass[slots, :, j].numpy())
        add("residual_finite", stats.finite[slots].numpy())

    def _to_table(self, columns: dict[str, list[np.ndarray]]) -> pa.Table:
        """Concatenate batches along tokens, then flatten layer-major into Arrow arrays."""
        arrays = []
        for field in self.schema:
            # [n_layers, T_total, ...] -> rows ordered by layer, then document order
            data = np.concatenate(columns[field.name], axis=1) if columns else np.empty((0, 0))
            if pa.types.is_dictionary(field.type):
                codes = np.ascontiguousarray(data).reshape(-1)
                indices = pa.array(codes, type=field.type.index_type, mask=codes < 0)
                names = pa.array(SITES if field.name == "site" else CATEGORIES, pa.string())
                arrays.append(pa.DictionaryArray.from_arrays(indices, names))
            elif field.name in ("line", "byte_start", "byte_end"):
                flat = np.ascontiguousarray(data).reshape(-1)
                arrays.append(pa.array(flat, type=field.type, mask=flat < 0))
            elif pa.types.is_fixed_size_list(field.type):
                width = field.type.list_size
                flat = np.ascontiguousarray(data).reshape(-1)
                values = pa.array(flat, type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(values, width))
            else:
                arrays.append(pa.array(np.ascontiguousarray(data).reshape(-1), type=field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _partials(
        self, inputs: list[tuple[LensStats, Tensor, Tensor]], groups: GroupIds
    ) -> dict[str, dict]:
        """Partial aggregates of the shard (for summary.json): per written layer, overall and by
        group, and the histograms of the tokens' convergence layers over the captured layers."""

        def cat(get) -> Tensor:
            return torch.cat([get(s) for s, _, _ in inputs], dim=1)

        lp, rank = cat(lambda s: s.target_logprob), cat(lambda s: s.target_rank)
        top1, finite = cat(lambda s: s.topk_ids[..., 0]), cat(lambda s: s.finite)
        ent = cat(lambda s: s.entropy) if self.request.entropy else None
        kl = cat(lambda s: s.kl_final) if self.request.kl_final else None
        a_lp, a_rank = cat(lambda s: s.ahead_logprob), cat(lambda s: s.ahead_rank)
        sets = cat(lambda s: s.set_logmass)
        target_id = torch.cat([t[:, 0] for _, t, _ in inputs])
        out: dict[str, dict] = {}
        for site, prefix in ((0, ""), (1, ATTN_PREFIX)):
            rows = [(layer, slot) for s, layer, slot in self.rows if s == site]
            if not rows:
                continue
            slots = [slot for _, slot in rows]
            part = layer_partials(
                layers=[layer for layer, _ in rows],
                target_logprob=lp[slots],
                target_rank=rank[slots],
                top1=top1[slots],
                final_top1=top1[self.final_slot],
                target_id=target_id,
                finite=finite[slots],
                entropy=None if ent is None else ent[slots],
                kl_final=None if kl is None else kl[slots],
                ahead_logprob=a_lp[slots],
                ahead_rank=a_rank[slots],
                set_logmass=sets[slots],
                set_names=self.set_names,
                groups=groups,
            )
            out.update({prefix + key: value for key, value in part.items()})
        n_cap = len(self.captured)
        conv = convergence_layers(top1[:n_cap], finite[:n_cap], self.captured)
        out[CONVERGENCE_KEY] = convergence_partial(conv, self.captured, groups)
        return out
