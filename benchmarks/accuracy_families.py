"""Largest error per column of a real run against the float64 reference, for every model family.

For each family a tiny random model is built and saved (safetensors), a job runs over a few code
snippets through the real path (load, self-check, capture, lens, Parquet), and every column is
compared with a reference computed independently: HF ``output_hidden_states`` read through the
head in float64 for layers 0..L-1 and the model's own logits for layer L.

    python benchmarks/accuracy_families.py [--impl torch|triton]

Writes ``benchmarks/results/accuracy_families-<impl>.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from codelens.engine.model.loading import load_model
from codelens.engine.schemas import validate_spec
from codelens.engine.zoo.tiny_models import TINY_FAMILIES, build_tiny_model
from codelens.kernels import LensRequest, lens_stats_from_logits
from codelens.workers.job import run_job

SNIPPETS = [
    "def add(a, b):\n    return a + b\n\n\n"
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "import os\n\nfor name in sorted(os.listdir('.')):\n"
    "    if name.endswith('.py'):\n        print(name)\n",
    "x = {k: v * 2 for k, v in zip('abc', range(3))}\nassert len(x) == 3, x\n",
]
FLOAT = ["lse", "entropy", "target_logprob", "kl_final", "topk_logprobs", "ahead_logprob", "set_kw"]
INT = ["target_rank", "ahead_rank", "topk_ids"]


def family_errors(family: str, root: Path, impl: str) -> dict[str, float]:
    model_dir = build_tiny_model(root / family, family)
    corpus = root / f"{family}-src"
    corpus.mkdir()
    for i, text in enumerate(SNIPPETS):
        (corpus / f"s{i}.py").write_text(text)
    spec = validate_spec(
        {
            "model": {"path": str(model_dir), "device": "cpu"},
            "corpus": {"paths": [str(corpus / "*.py")]},
            "tokens": {"window": 128, "overlap": 16},
            "lens": {
                "k": 5,
                "lookahead": [2, 3],
                "impl": impl,
                "token_sets": {"kw": ["def", "return", "import"]},
            },
            "output": {"dir": str(root / f"{family}-run")},
        }
    )
    run_job(spec, show_progress=False)
    table = pq.read_table(root / f"{family}-run" / "lens")
    rows = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
    loaded = load_model(model_dir, device="cpu")
    tok, head = loaded.tokenizer, loaded.parts.head
    n_blocks = len(loaded.parts.blocks)
    kw = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("def", "return", "import")})
    request = LensRequest(k=5, token_sets=(("kw", torch.tensor(kw)),))
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    errors = {c: 0.0 for c in FLOAT} | {c: 0 for c in INT}
    for doc, text in enumerate(SNIPPETS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = loaded.model(
                torch.tensor([[bos] + ids]), output_hidden_states=True, use_cache=False
            )
        z = [
            head.logits(out.hidden_states[layer][0, 1:].double(), torch.float64)
            for layer in range(n_blocks)
        ]
        z = torch.stack([*z, out.logits[0, 1:].double()])
        n = len(ids)
        targets = torch.full((n, 3), -1, dtype=torch.long)
        for i in range(n):
            for c, o in enumerate((1, 2, 3)):
                if i + o < n:
                    targets[i, c] = ids[i + o]
        want = lens_stats_from_logits(z, targets, request, z[-1])
        mine = rows["doc"] == doc
        order = np.lexsort((rows["pos"][mine], rows["layer"][mine]))

        def col(name, _mine=mine, _order=order, _n=n):
            v = rows[name][_mine][_order]
            v = np.stack(v) if v.dtype == object else v
            return v.reshape(n_blocks + 1, _n, *v.shape[1:])

        ref = {
            "lse": want.lse,
            "entropy": want.entropy,
            "target_logprob": want.target_logprob,
            "kl_final": want.kl_final,
            "topk_logprobs": want.topk_logprobs,
            "ahead_logprob": want.ahead_logprob,
            "set_kw": want.set_logmass[..., 0],
            "target_rank": want.target_rank,
            "ahead_rank": want.ahead_rank,
            "topk_ids": want.topk_ids,
        }
        for name in FLOAT:
            diff = np.abs(col(name).astype(np.float64) - ref[name].numpy().astype(np.float64))
            errors[name] = max(errors[name], float(np.nanmax(diff)))
        for name in INT:
            errors[name] = max(
                errors[name], int(np.abs(col(name).astype(np.int64) - ref[name].numpy()).max())
            )
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="torch", choices=["torch", "triton"])
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in TINY_FAMILIES:
            results[family] = family_errors(family, Path(tmp), args.impl)
            print(family, results[family], file=sys.stderr)
    versions = {
        d: importlib.metadata.version(d) for d in ("code-llm-lens", "torch", "transformers")
    }
    report = {
        "impl": args.impl,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "versions": versions,
        "command": " ".join(["python", *sys.argv]),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "max_abs_error": results,
    }
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"accuracy_families-{args.impl}.json").write_text(json.dumps(report, indent=2) + "\n")
    cols = FLOAT + INT
    lines = [
        f"# Largest error per column against the float64 reference (impl {args.impl}, fp32 models)",
        "",
        f"Command: `{report['command']}` at {report['written_at']}; "
        f"{report['machine']}; {versions}.",
        "Float columns: max |difference| (nats); integer columns: max |difference| (0 = exact).",
        "",
        "| family | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for family, errs in results.items():
        lines.append(
            f"| {family} | "
            + " | ".join(f"{errs[c]:.1e}" if c in FLOAT else str(errs[c]) for c in cols)
            + " |"
        )
    worst = {c: max(r[c] for r in results.values()) for c in cols}
    lines.append(
        "| **worst** | "
        + " | ".join(f"**{worst[c]:.1e}**" if c in FLOAT else f"**{worst[c]}**" for c in cols)
        + " |"
    )
    (out / f"accuracy_families-{args.impl}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
