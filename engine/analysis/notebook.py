"""The Python API for notebooks: the lens over one text, as rows or as the grid figure.

    from codelens.engine import Lens
    lens = Lens.load("runs/demo/model")                  # self-check included
    rows = lens.text(source, language="python", k=5, lookahead=(2,))   # a pyarrow.Table
    rows.to_pandas()
    lens.grid(source, metric="kl")                      # the figure `codelens plot` draws

``Lens.text`` plans the text exactly as a one-document corpus (same tokenizer pass, windows,
targets, spans and syntax categories) and runs it through the same shard runner as
``codelens run``, so its rows equal the rows a job over a file with that text writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from codelens.engine.analysis.grid import METRICS, compute_grid, grid_figure
from codelens.engine.data.corpus import text_document
from codelens.engine.data.plan import plan_document
from codelens.engine.data.windows import Shard
from codelens.engine.errors import SpecError
from codelens.engine.model.loading import LoadedModel, load_model
from codelens.engine.run.runner import ShardRunner
from codelens.engine.schemas import ExecutionSpec, LensSpec, TokensSpec, validate_section


def _given(**options: Any) -> dict[str, Any]:
    """The options that were given (None means: the job spec's default)."""
    return {name: value for name, value in options.items() if value is not None}


class Lens:
    """A loaded, self-checked model, ready to run the lens over texts.

    Args:
        loaded: what ``load_model`` returned (use :meth:`load`).
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> Lens:
        """Load a model as ``codelens run`` does (``model`` in a job spec): a local directory,
        or ``OWNER/NAME`` from the local Hugging Face cache at ``revision`` (default main).

        Raises:
            ModelLoadError, UnsupportedArchitectureError, SelfCheckError: as a job would.
        """
        return cls(
            load_model(
                model_dir,
                revision=revision,
                dtype=dtype,
                device=device,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
            )
        )

    @property
    def model(self):
        """The HF causal LM (eval mode)."""
        return self.loaded.model

    @property
    def tokenizer(self):
        """Its tokenizer."""
        return self.loaded.tokenizer

    @property
    def n_layers(self) -> int:
        """L, the decoder blocks: lens layers are 0 (embeddings) .. L."""
        return len(self.loaded.parts.blocks)

    def __repr__(self) -> str:
        loaded = self.loaded
        return (
            f"Lens({loaded.family}, {self.n_layers} layers, {loaded.path}, "
            f"{str(loaded.dtype).removeprefix('torch.')} on {loaded.device})"
        )

    def text(
        self,
        source: str,
        *,
        language: str | None = "python",
        layers: str | Sequence[int] | None = None,
        k: int | None = None,
        lookahead: Sequence[int] | None = None,
        entropy: bool | None = None,
        kl_final: bool | None = None,
        token_sets: Mapping[str, Sequence[str | int]] | None = None,
        sites: Sequence[str] | None = None,
        decoder_blocks: int | None = None,
        impl: str | None = None,
        precision: str | None = None,
        window: int | None = None,
        overlap: int | None = None,
        add_bos: bool | None = None,
        batch_tokens: int | None = None,
    ) -> pa.Table:
        """The lens rows of one text: the columns and values ``codelens run`` writes for it.

        Every option is the job-spec field of the same name (``lens.*``, ``tokens.*``,
        ``execution.batch_tokens``); None keeps that field's default (``codelens schema``).

        Args:
            source: the text (e.g. a source file's content).
            language: its language, as a corpus document's (syntax categories); None: plain text.

        Returns:
            A ``pyarrow.Table`` with one row per (position, layer, site), ``doc`` 0.

        Raises:
            SpecError: an invalid option, a setting that does not fit the model, or a text with
                nothing to run (empty, binary, too large).
        """
        what = "Lens.text() options"
        lens = validate_section(
            LensSpec,
            _given(
                layers=layers if layers is None or isinstance(layers, str) else list(layers),
                k=k,
                lookahead=None if lookahead is None else list(lookahead),
                entropy=entropy,
                kl_final=kl_final,
                token_sets=None
                if token_sets is None
                else {name: list(v) for name, v in token_sets.items()},
                sites=None if sites is None else list(sites),
                decoder_blocks=decoder_blocks,
                impl=impl,
                precision=precision,
            ),
            "lens",
            what=what,
        )
        tokens = validate_section(
            TokensSpec, _given(window=window, overlap=overlap, add_bos=add_bos), "tokens", what=what
        )
        execution = validate_section(
            ExecutionSpec, _given(batch_tokens=batch_tokens), "execution", what=what
        )
        document = text_document(source, language=language)
        if not document.ok:
            raise SpecError(f"Lens.text: the text is {document.status}: give some code")
        windows = plan_document(document, self.tokenizer, tokens, lens.lookahead)
        if not windows:
            raise SpecError("Lens.text: the text has no tokens: give some code")
        runner = ShardRunner(lens, self.loaded, batch_tokens=execution.batch_tokens)
        n_tokens = sum(w.n_emit for w in windows)
        table, _ = runner.run_shard(Shard(0, windows, n_tokens))
        return table

    def grid(self, source: str, *, metric: str = "logprob", add_bos: bool = True, title: str = ""):
        """The per-prompt grid of ``codelens plot`` for one text, as a matplotlib ``Figure``.

        Args:
            source: the text (at most 512 tokens: a wider grid is unreadable).
            metric: the cell colour: ``logprob``, ``rank`` (of the true next token), ``kl`` or
                ``entropy``.
            add_bos: prepend the BOS, as jobs do by default.
            title: the figure's title (default: what it shows).

        Raises:
            SpecError: an unknown metric.
            PlotError: the text is empty or too long.
        """
        if metric not in METRICS:
            raise SpecError(
                f"Lens.grid: metric must be one of {', '.join(METRICS)}, got {metric!r}"
            )
        grid = compute_grid(self.loaded, source, add_bos=add_bos)
        return grid_figure(grid, metric, title=title)


__all__ = ["Lens"]
