"""Which causal-LM architectures of the installed transformers the lens supports, and why not.

For every ``model_type`` with a causal-LM class, :func:`sweep_architectures` builds a tiny model on
the CPU from its config class (:func:`~codelens.engine.zoo.tiny_models.generic_tiny_config`: random
weights, a few blocks), finds its lens parts (``model.surgery``: the table, else the general rule)
and runs the load-time self-check (the lens at layer L must reproduce the model's logits). Each
architecture ends in one of three states, always with the reason:

* ``table`` / ``rule``: supported; the head came from the surgery table or the general rule.
* ``refused``: the lens cannot read it (the surgery module or the self-check says why).
* ``not built``: no tiny model could be made here (composite configs such as multimodal ones,
  configs whose sizes the generic builder cannot shrink, models that need extra packages); not a
  verdict on the lens.

``python -m codelens.engine.zoo.sweep [OUT.md]`` prints (or writes) the table.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from codelens.engine.errors import CodelensError
from codelens.engine.model.loading import auto_model_class, run_self_check
from codelens.engine.model.surgery import model_parts
from codelens.engine.zoo.tiny_models import (
    MULTIMODAL_FAMILIES,
    TINY_FAMILIES,
    generic_tiny_config,
    random_model,
    tiny_config,
)

MAX_PARAMETERS = 20_000_000
"""A tiny config bigger than this was not shrunk by the generic builder: not built (too slow)."""

VOCAB = 256


@dataclass(frozen=True)
class SweepRow:
    """One architecture's verdict."""

    model_type: str
    model_class: str
    state: str
    """'table', 'rule', 'refused' or 'not built'."""
    reason: str
    """Why refused or not built; for a supported one, what the lens reads (norm, post-process)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def sweep_one(model_type: str, model_class: str) -> SweepRow:
    """Build a tiny ``model_type`` model, find its lens parts and self-check them."""

    def row(state: str, reason: str) -> SweepRow:
        return SweepRow(model_type, model_class, state, reason)

    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    try:
        # The table's families have builders of their own (their config classes name sizes
        # differently); every other model_type gets the generic one.
        own = model_type in TINY_FAMILIES or model_type in MULTIMODAL_FAMILIES
        build = tiny_config if own else generic_tiny_config
        config = build(model_type, vocab_size=VOCAB, special_token_ids=special)
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        return row("not built", f"tiny config: {_first_line(e)}")
    if not own and any(key != "text_config" for key in getattr(config, "sub_configs", {}) or {}):
        return row("not built", "composite config: sub-models (a vision tower, ...) not shrunk")
    try:
        with torch.device("meta"):
            shape_only = auto_model_class(config).from_config(config)
            size = sum(p.numel() for p in shape_only.parameters())
        if size > MAX_PARAMETERS:
            return row("not built", f"the generic tiny config has {size:,} parameters")
        model = random_model(config)
    except Exception as e:  # noqa: BLE001
        return row("not built", f"tiny model: {_first_line(e)}")
    try:
        parts = model_parts(model)
        ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        run_self_check(model, parts, ids)
    except CodelensError as e:
        reason = str(e).split(". It has no entry in the model-surgery table")[0]
        return row("refused", reason.split(". To support")[0][:400])
    except Exception as e:  # noqa: BLE001 - the model's own forward failed on the probe
        return row("not built", f"forward: {_first_line(e)}")
    head = parts.head
    post = []
    if head.logit_scale != 1.0:
        post.append(f"logits x {head.logit_scale:g}")
    if head.softcap is not None:
        post.append(f"soft-cap {head.softcap:g}")
    norm = head.norm.kind.value + (" (1 + w)" if head.norm.weight_offset else "")
    return row(parts.head_source, ", ".join([norm, *post]))


def sweep_architectures(model_types: list[str] | None = None) -> list[SweepRow]:
    """One ``SweepRow`` per causal-LM ``model_type`` of the installed transformers (or those)."""
    from transformers.models.auto import modeling_auto
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    names = dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for family in MULTIMODAL_FAMILIES:  # read through their text tower (Mistral 3 has no causal LM)
        names.setdefault(family, modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[family])
    chosen = sorted(names) if model_types is None else model_types
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [sweep_one(t, names.get(t, "?")) for t in chosen]


def markdown(rows: list[SweepRow]) -> str:
    """The sweep as a Markdown table, with counts per state."""
    import transformers

    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines = [
        f"# Causal-LM architectures of transformers {transformers.__version__}",
        "",
        "Tiny random model of each, built on the CPU from its config class, lens parts found and "
        "self-checked (`python -m codelens.engine.zoo.sweep`). "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ".",
        "",
        "| model_type | class | lens | what it reads, or why not |",
        "|---|---|---|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.model_type}` | {r.model_class} | {r.state} | {reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    table = markdown(sweep_architectures())
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(table)
    print(table)
