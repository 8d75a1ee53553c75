"""The lens request resolved against a loaded model: which residuals to capture, which rows to
write.

``lens`` in a job spec names layers, sites and statistics; this module checks it against the model
(layer range, ``k`` against the vocabulary, token-set entries to ids, the ``attn`` site's modules,
the implementation for the device) and lays out the capture buffer:

    slots 0 .. C-1      block layers ``captured`` (the selected layers plus the final layer L,
                        which is the reference for ``kl_final`` and for the top-1 agreement)
    slots C .. C+A-1    ``attn``-site layers (l >= 1), when ``lens.sites`` has ``attn``

``rows`` lists, in written order, the ``(site, layer, slot)`` of every row kind a token emits.
Every bad request raises :class:`SpecError` naming the field and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from codelens.engine.data.language_words import WORD_KINDS, UnknownLanguageError, language_words
from codelens.engine.errors import SpecError, UnsupportedArchitectureError
from codelens.engine.model.loading import LoadedModel
from codelens.engine.model.surgery import attn_residual_modules, router_modules
from codelens.engine.row_schema import SITES
from codelens.engine.schemas import LanguageTokenSet, LensSpec
from codelens.kernels import LensImpl, LensRequest, resolve_impl

BLOCK_SITE, ATTN_SITE = SITES.index("block"), SITES.index("attn")


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


def _word_ids(word: str, tokenizer, *, single_token: bool = False) -> list[int]:
    """First token of ``word`` after a space and at the start of a line (after a newline).

    With ``single_token`` a spelling counts only when that token is the whole word.
    """
    ids = []
    spaced = tokenizer.encode(" " + word, add_special_tokens=False)
    if spaced and (not single_token or len(spaced) == 1):
        ids.append(spaced[0])
    # At a line start: the first token that is not only the newline (a tokenizer may also merge
    # the newline into the word's token; that token is the one the model sees there).
    line_start = tokenizer.encode("\n" + word, add_special_tokens=False)
    for i, token in enumerate(line_start):
        if tokenizer.decode([token]).strip():
            if not single_token or tokenizer.decode(line_start[i:]) == tokenizer.decode([token]):
                ids.append(token)
            break
    return ids


def _language_ids(name: str, source: LanguageTokenSet, tokenizer) -> list[int]:
    """The ids of a ``{keywords: LANG, builtins: LANG}`` set."""
    ids: list[int] = []
    for kind in WORD_KINDS:
        language = getattr(source, kind)
        if language is None:
            continue
        try:
            words = language_words(language, kind)
        except UnknownLanguageError as exc:
            raise SpecError(f"lens.token_sets.{name}.{kind}: {exc}") from None
        if not words:
            raise SpecError(
                f"lens.token_sets.{name}.{kind}: Pygments' {language!r} lexer lists no {kind}; "
                f"use {'builtins' if kind == 'keywords' else 'keywords'}: {language}, or list "
                "the words yourself"
            )
        for word in words:
            ids += _word_ids(word, tokenizer, single_token=source.single_token)
    if not ids:
        raise SpecError(
            f"lens.token_sets.{name}: none of the language's words is a single token of this "
            "model's tokenizer; drop single_token: true to count the first token of each word"
        )
    return ids


def resolve_token_sets(
    token_sets: dict[str, list[str | int] | LanguageTokenSet], tokenizer, vocab_size: int
) -> tuple[tuple[tuple[str, Tensor], ...], dict[str, int]]:
    """Token-set entries to ids: a string counts the first token of its encoding (no specials),
    an int is an id, a ``LanguageTokenSet`` expands to its language's words.

    Returns:
        ``(name, sorted unique ids)`` per set, and the overlaps between sets before any
        ``exclusive`` removal: ``{"a&b": shared ids}`` for each pair that shares some.
    """
    resolved: dict[str, set[int]] = {}
    for name, entries in token_sets.items():
        ids: list[int] = []
        if isinstance(entries, LanguageTokenSet):
            ids = _language_ids(name, entries, tokenizer)
        else:
            for entry in entries:
                if isinstance(entry, int):
                    if not 0 <= entry < vocab_size:
                        raise SpecError(
                            f"lens.token_sets.{name}: id {entry} is outside the vocabulary "
                            f"[0, {vocab_size})"
                        )
                    ids.append(entry)
                else:
                    encoded = tokenizer.encode(entry, add_special_tokens=False)
                    if not encoded:
                        raise SpecError(f"lens.token_sets.{name}: {entry!r} encodes to no tokens")
                    ids.append(encoded[0])
        resolved[name] = {i for i in ids if 0 <= i < vocab_size}
    names = list(resolved)
    overlaps = {
        f"{a}&{b}": len(resolved[a] & resolved[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if resolved[a] & resolved[b]
    }
    final = {}
    for name, ids in resolved.items():
        if isinstance(token_sets[name], LanguageTokenSet) and token_sets[name].exclusive:
            others = set().union(*(resolved[o] for o in names if o != name))
            ids = ids - others
            if not ids:
                raise SpecError(
                    f"lens.token_sets.{name}: every id is also in another set, so exclusive: "
                    "true leaves it empty; drop exclusive or the overlapping set"
                )
        final[name] = torch.tensor(sorted(ids), dtype=torch.long)
    return tuple(final.items()), overlaps


@dataclass(frozen=True)
class ResolvedLens:
    """A job's ``lens`` section checked against one model.

    Attributes:
        spec: the ``lens`` section it came from.
        n_blocks: the model's decoder blocks (L).
        layers: block layers whose rows are written, as requested.
        captured: block layers captured (``layers`` plus L), ascending; buffer slots 0..C-1.
        attn_layers: layers whose post-attention residual is captured (slots C..); empty unless
            ``attn`` is a site.
        attn_modules: per block, the module whose input is the post-attention residual (None
            without the ``attn`` site).
        rows: ``(site index in SITES, layer, slot)`` of each written row kind, in written order.
        decoded_slots: slots run through the last ``spec.decoder_blocks`` blocks before the head.
        request: what the lens kernels compute (token-set ids on the model's device).
        impl: the lens implementation for the model's device.
        token_set_ids: token-set name -> sorted vocabulary ids (recorded in job.json).
        token_set_overlaps: ``"a&b"`` -> ids the two sets share, before ``exclusive`` removal
            (recorded in job.json).
        pad_id: the id used to right-pad batches.
        routers: per block, its mixture-of-experts router (None for a dense block); None unless
            ``spec.router_topk``.
        router_k: experts each router chooses per token (0 without ``routers``).
    """

    spec: LensSpec
    n_blocks: int
    layers: tuple[int, ...]
    captured: tuple[int, ...]
    attn_layers: tuple[int, ...]
    attn_modules: tuple[nn.Module, ...] | None
    rows: tuple[tuple[int, int, int], ...]
    decoded_slots: tuple[int, ...]
    request: LensRequest
    impl: LensImpl
    token_set_ids: dict[str, list[int]]
    pad_id: int
    token_set_overlaps: dict[str, int] = field(default_factory=dict)
    routers: tuple[nn.Module | None, ...] | None = None
    router_k: int = 0

    @property
    def final_slot(self) -> int:
        """Buffer slot of the final block layer L (the KL and agreement reference)."""
        return len(self.captured) - 1

    @property
    def set_names(self) -> list[str]:
        """Token-set names, in spec order (the ``set_<name>`` columns)."""
        return list(self.token_set_ids)

    def site_rows(self, site: int) -> list[tuple[int, int]]:
        """``(layer, slot)`` of the written rows of one site, in written order."""
        return [(layer, slot) for s, layer, slot in self.rows if s == site]


def resolve_lens(lens: LensSpec, loaded: LoadedModel) -> ResolvedLens:
    """Check ``lens`` against the loaded model and lay out the capture buffer.

    Raises:
        SpecError: a layer out of range, ``k`` above the vocabulary, a bad token-set entry, the
            ``attn`` site on an architecture without a post-attention point, ``decoder_blocks``
            not below the number of blocks, or an implementation the device cannot run.
    """
    blocks, head = loaded.parts.blocks, loaded.parts.head
    n_blocks = len(blocks)
    layers = resolve_layers(lens.layers, n_blocks)
    # Block layers are captured whatever the sites (the convergence layer is defined over them).
    captured = sorted(set(layers) | {n_blocks})
    attn_layers = [layer for layer in layers if layer >= 1] if "attn" in lens.sites else []
    attn_modules = None
    if "attn" in lens.sites:
        try:
            attn_modules = tuple(attn_residual_modules(loaded.model))
        except UnsupportedArchitectureError as e:
            raise SpecError(f"lens.sites: attn: {e}") from None
    routers, router_k = None, 0
    if lens.router_topk:
        try:
            found, router_k = router_modules(loaded.model)
        except UnsupportedArchitectureError as e:
            raise SpecError(f"lens.router_topk: {e}") from None
        routers = tuple(found)
    n_cap = len(captured)
    block_rows = [(BLOCK_SITE, layer, captured.index(layer)) for layer in layers]
    attn_rows = [(ATTN_SITE, layer, n_cap + i) for i, layer in enumerate(attn_layers)]
    rows = (block_rows if "block" in lens.sites else []) + attn_rows
    if lens.decoder_blocks >= n_blocks:
        raise SpecError(
            f"lens.decoder_blocks={lens.decoder_blocks} must be smaller than the model's "
            f"{n_blocks} blocks (0 switches the variant off)"
        )
    start = n_blocks - lens.decoder_blocks
    decoded = (
        []
        if not lens.decoder_blocks
        else [i for i, layer in enumerate(captured) if layer < start]
        + [n_cap + i for i, layer in enumerate(attn_layers) if layer <= start]
    )
    if lens.k > head.vocab_size:
        raise SpecError(
            f"lens.k={lens.k} is larger than the vocabulary ({head.vocab_size} rows); "
            f"choose k <= {head.vocab_size}"
        )
    token_sets, overlaps = resolve_token_sets(lens.token_sets, loaded.tokenizer, head.vocab_size)
    try:
        impl = resolve_impl(LensImpl(lens.impl), loaded.device, d_model=head.d_model, k=lens.k)
    except RuntimeError as exc:  # kernels/ cannot raise our errors; the reason names the fix
        raise SpecError(str(exc)) from None
    pad_id = loaded.tokenizer.pad_token_id
    return ResolvedLens(
        spec=lens,
        n_blocks=n_blocks,
        layers=tuple(layers),
        captured=tuple(captured),
        attn_layers=tuple(attn_layers),
        attn_modules=attn_modules,
        rows=tuple(rows),
        decoded_slots=tuple(decoded),
        request=LensRequest(
            k=lens.k,
            entropy=lens.entropy,
            kl_final=lens.kl_final,
            token_sets=tuple((name, ids.to(loaded.device)) for name, ids in token_sets),
        ),
        impl=impl,
        token_set_ids={name: ids.tolist() for name, ids in token_sets},
        token_set_overlaps=overlaps,
        pad_id=pad_id if pad_id is not None else 0,
        routers=routers,
        router_k=router_k,
    )
