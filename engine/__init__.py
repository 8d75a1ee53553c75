"""The engine: job contract, model surgery, data planning, the lens pipeline, analysis.

Sub-packages by job (imports run one way: ``analysis -> run -> model, data``; ``zoo -> model,
data``; all may use the contract modules ``schemas``, ``errors``, ``row_schema``):

* ``model``: model surgery, loading with the self-check, residual capture;
* ``data``: corpus reading, tokenization with spans, syntax categories, windows, planning;
* ``run``: the resolved lens request, the lens pipeline, rows, aggregates, the run directory;
* ``analysis``: reports, comparisons, the per-prompt grid, the notebook API;
* ``zoo``: tiny models of every family, the bundled default model and its training.

The notebook API is importable from here (loaded on first use, so importing a sub-package does
not pull in torch or matplotlib)::

    from codelens.engine import Lens, open_run
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codelens.engine.analysis.notebook import Lens
    from codelens.engine.analysis.runs import RunTables, open_run

__all__ = ["Lens", "RunTables", "open_run"]

_LAZY = {
    "Lens": "codelens.engine.analysis.notebook",
    "RunTables": "codelens.engine.analysis.runs",
    "open_run": "codelens.engine.analysis.runs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'codelens.engine' has no attribute {name!r}")
