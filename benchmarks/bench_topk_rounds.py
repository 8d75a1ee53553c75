"""Insertion rounds of the fused kernel's streaming top-k, counted exactly on real logits.

The fused kernel (``kernels/lens_triton.py``) keeps a top-k state per row and, per
``[BLOCK_M, BLOCK_N]`` tile, runs insertion rounds while any row of the block has a candidate:
each round inserts every row's largest remaining candidate. A round costs the same whatever
the number of rows that use it, so a tile's cost is set by the row with the most insertions.
The chunked strategy's fold runs one row per program: its rounds are that row's own.

Within a tile the insertions go in (value desc, id asc) order and none is evicted in the same
tile, so the insertions of row ``r`` in tile ``i`` of a vocabulary chunk are exactly
``|topk(chunk prefix through tile i) ∩ tile i|``. This script counts them with ``torch.topk``
(no kernel, no GPU) for every row block and chunk, and reports per tile: the block's rounds
(the fused kernel's cost: the worst row), the mean row's insertions (what a per-row insertion
costs) and their ratio. The shared cross-chunk bound ``tau`` is left out, so the fused counts
are an upper bound (chunks that start after a row's first chunk finished prune more).

Rows: ``bundled``, every layer of the bundled model over its held-out code (real logits); and
``synthetic``/``forward``, ``bench_kernel.py``'s problems at the Qwen2.5-Coder-7B vocabulary
(near-i.i.d. logits, the worst case). With the default kernel's loop sizes from
``kernel_sm90.json`` (``bench_kernel.py --compile-only --sweep``: the SASS of one insertion round
and of the rest of a tile's epilogue) the counts become microseconds of epilogue per tile at the
H100/H200 issue rate, next to the tile's MMA time at dense bf16 peak.

Writes ``benchmarks/results/topk_rounds.json`` and ``topk_rounds.md``.

Usage::

    python benchmarks/bench_topk_rounds.py [--rows 1024] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import GPU_MODELS, MODELS, PROBLEMS  # noqa: E402

# The shapes the predictions are for (not the CPU smoke run's).
SHAPES = tuple(MODELS[key] for key in GPU_MODELS)

from codelens.workers.bench import provenance, provenance_markdown  # noqa: E402

BLOCK_M, BLOCK_N, VOCAB_CHUNK, K = 128, 128, 4096, 10
# H100/H200 SXM: 132 SMs, dense bf16 989 TFLOP/s, 4 warp schedulers per SM at ~1.755 GHz.
SMS, PEAK_FLOPS, SCHEDULERS, CLOCK_HZ = 132, 989e12, 4, 1.755e9
# What cuBLAS reaches on the lens GEMM shapes, and the fused kernel's MMA efficiency on L2-bound
# 128x128 tiles (kernels/DESIGN.md, "Choosing the strategy"): assumptions until a device measures.
GEMM_FLOPS, FUSED_MMA_EFFICIENCY = 700e12, 0.75
# Other tiles' MMA efficiency is taken as L2-bound like the 128x128 tile's: in proportion to the
# tile's reuse (products per loaded A/W element pair, BM BN / (BM + BN): 64 at 128x128, 42.7 at
# 128x64), and at most this.
MAX_MMA_EFFICIENCY = 0.85
FOLD_COLUMNS = 1024  # the fold kernel's column step (LensChunkedConfig.fold_block_v)
# The final layer's mixture (kernels/final_mixture.py) per token: the final row's logits, then
# e @ W_U as bf16 hi + lo: three passes of 2 d FLOP per vocabulary entry.
MIXTURE_GEMMS = 3


def tile_rounds(
    logits: torch.Tensor,
    k: int,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    vocab_chunk: int = VOCAB_CHUNK,
) -> dict[str, torch.Tensor]:
    """Per (row block, chunk, tile): the block's rounds and its mean row's insertions.

    The running top-k of every row is carried from tile to tile (and restarted per vocabulary
    chunk); a tile's insertions for a row are the entries of the new top-k that come from it.

    Args:
        logits: ``[R, V]`` fp32, ``R`` a multiple of ``block_m``.
        k: the top-k size; ``block_m`` x ``block_n``: the tile; ``vocab_chunk``: the columns
            after which the state restarts (the fused kernel's chunk; ``V`` for the fold kernel,
            whose state runs over the whole vocabulary).

    Returns:
        ``worst [n]`` (max over the block's rows), ``mean [n]`` (mean over them) and ``first
        [n]`` (True for a chunk's first tile), one entry per tile of every block and chunk.
    """
    n_rows, n_vocab = logits.shape
    # Ties go to the smaller id, as in the kernel: a tiny id-ordered offset breaks exact ties.
    values = logits.double() - torch.arange(n_vocab, dtype=torch.float64) * 1e-12
    worst, mean, first = [], [], []
    for c0 in range(0, n_vocab, vocab_chunk):
        state = values[:, :0]
        for t0 in range(c0, min(n_vocab, c0 + vocab_chunk), block_n):
            tile = values[:, t0 : min(n_vocab, t0 + block_n, c0 + vocab_chunk)]
            both = torch.cat([state, tile], 1)
            top = both.topk(min(k, both.shape[1]), dim=1)
            inserted = (top.indices >= state.shape[1]).sum(1).double().view(-1, block_m)
            worst.append(inserted.max(1).values)
            mean.append(inserted.mean(1))
            first.append(torch.full((n_rows // block_m,), t0 == c0))
            state = top.values
    return {"worst": torch.cat(worst), "mean": torch.cat(mean), "first": torch.cat(first)}


def bundled_logits(n_rows: int) -> tuple[torch.Tensor, str]:
    """Every layer's lens logits of the bundled model over its held-out files, ``n_rows`` rows:
    each file's rows layer by layer, so a block of ``BLOCK_M`` rows is that many tokens of one
    layer (the fused kernel's row blocks without KL's slot layout)."""
    from codelens.engine.model.loading import load_model
    from codelens.engine.zoo.default_model import default_model_dir, held_out_files

    loaded = load_model(default_model_dir(), device="cpu")
    head = loaded.parts.head
    rows: list[torch.Tensor] = []
    files = held_out_files()
    for path in files[:: max(1, len(files) // 16)]:
        ids = loaded.tokenizer(path.read_text(errors="replace"))["input_ids"][:512]
        with torch.no_grad():
            states = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        # hidden_states[-1] is after the final norm in HF Llama: the lens reads the last block's
        # output through the norm, which is the model's own logits there.
        for layer in states[:-1]:
            rows.append(head.logits(layer[0]))
        rows.append(loaded.model.lm_head(states[-1][0]).float())
        if sum(r.shape[0] for r in rows) >= n_rows:
            break
    logits = torch.cat(rows)[: n_rows // BLOCK_M * BLOCK_M]
    return logits, f"bundled model {default_model_dir().name}, {logits.shape[0]} rows"


def problem_logits(source: str, n_rows: int) -> tuple[torch.Tensor, str]:
    """The lens logits of ``bench_kernel.py``'s ``source`` problem at Qwen2.5-Coder-7B's shape."""
    name, d, V, n_layers = MODELS["qwen7b"]
    n_tokens = -(-n_rows // n_layers)
    hidden, head, _, _ = PROBLEMS[source](d, V, n_layers, n_tokens, "cpu")
    logits = head.logits(hidden.reshape(-1, d).float())[: n_rows // BLOCK_M * BLOCK_M]
    return logits, f"{source} rows at {name}'s shape (d {d}, V {V}), {logits.shape[0]} rows"


def sm90_loop_sizes(path: Path) -> dict[str, dict[str, int]] | None:
    """The default kernels' ``{round, epilogue}`` SASS per warp from ``kernel_sm90.json`` (its
    first entry of each strategy: the fused tile, the fold kernel's column step; and, as
    ``triton-fused-slot-kl``, the earliest kept entry of the fused kernel at the default
    configuration that has KL in its epilogue), or None when the file or the loop sizes are
    missing."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    entries = record.get("entries", [])
    default = entries[0]["config"] if entries else {}
    # Today's slot-KL entry (the sweep compiles one) before any earlier epilogue's.
    slot_kl = [
        e
        for e in record.get("earlier_epilogues", []) + entries
        if e.get("strategy") == "triton-fused"
        and "no KL" not in e.get("epilogue", "")
        and {k: v for k, v in e["config"].items() if k != "kl_by_mixture"}
        == {k: v for k, v in default.items() if k != "kl_by_mixture"}
        and e.get("topk_round_instructions")
    ]
    picks = {
        "triton-fused": next((e for e in entries if e.get("strategy") == "triton-fused"), {}),
        "triton-chunked": next((e for e in entries if e.get("strategy") == "triton-chunked"), {}),
        "triton-fused-slot-kl": slot_kl[-1] if slot_kl else {},
    }
    sizes = {}
    for strategy, entry in picks.items():
        if not entry.get("topk_round_instructions"):
            return None
        sizes[strategy] = {
            "round": entry["topk_round_instructions"][0],
            "epilogue": entry["epilogue_per_tile"],
            "warps": entry["config"]["num_warps"],
            "columns": entry["config"].get("block_n", entry["config"].get("fold_block_v")),
            "rows": entry["config"].get("block_m", entry["config"].get("fold_block_r")),
        }
    return sizes


def sm90_fused_candidates(path: Path) -> list[dict[str, Any]]:
    """The fused kernel's entries of ``kernel_sm90.json`` with today's epilogue without KL at the
    default vocabulary chunk, each as ``{tile, subtiles, warps, ctas_per_sm, spill_stores, round,
    epilogue}`` (SASS per warp; ``ctas_per_sm`` as the sweep wrote it), or ``[]`` when the file
    or the loop sizes are missing."""
    if not path.exists():
        return []
    out = []
    for e in json.loads(path.read_text()).get("entries", []):
        c = e["config"]
        if (
            e.get("strategy") != "triton-fused"
            or not c.get("kl_by_mixture")
            or c.get("vocab_chunk") != VOCAB_CHUNK
            or not e.get("topk_round_instructions")
            or not e.get("ctas_per_sm")
        ):
            continue
        out.append(
            {
                "tile": f"{c['block_m']}x{c['block_n']}",
                "block_k": c["block_k"],
                "subtiles": c.get("epilogue_subtiles", 1),
                "warps": c["num_warps"],
                "stages": c["num_stages"],
                "ctas_per_sm": e["ctas_per_sm"],
                "spill_stores": e["spill_stores"],
                "round": max(e["topk_round_instructions"]),
                "epilogue": e["epilogue_per_tile"],
            }
        )
    return out


def mma_efficiency(block_m: int, block_n: int) -> float:
    """The MMA's assumed fraction of dense peak on a ``block_m x block_n`` tile: L2-bound, in
    proportion to the tile's reuse against the 128x128 tile's ``FUSED_MMA_EFFICIENCY``."""

    def reuse(m: int, n: int) -> float:
        return m * n / (m + n)

    return min(
        MAX_MMA_EFFICIENCY, FUSED_MMA_EFFICIENCY * reuse(block_m, block_n) / reuse(BLOCK_M, BLOCK_N)
    )


def predicted_candidates(by_tile: dict[str, float], candidates: list[dict]) -> list[dict]:
    """Predicted fraction of the cuBLAS bf16 matmul per model shape for each fused candidate
    whose tile's rounds were counted (``by_tile``: rounds per tile of each ``BMxBN``; a tile of
    ``s`` epilogue sub-tiles runs the rounds of its ``BMx(BN/s)`` slices one after the other).

    ``serial``: MMA (at ``mma_efficiency`` of the tile) plus epilogue, as with one CTA per SM;
    ``overlapped``: with two or more CTAs per SM one CTA's epilogue can run under another's MMA,
    so a tile costs at best the larger of the two (the bound a device can approach, not reach).
    Both add the final layer's mixture passes, as ``predicted_fractions`` does.
    """
    issue = SMS * SCHEDULERS * CLOCK_HZ
    out = []
    for c in candidates:
        bm, bn = (int(x) for x in c["tile"].split("x"))
        slice_tile = f"{bm}x{bn // c['subtiles']}"
        if slice_tile not in by_tile:
            continue
        rounds = c["subtiles"] * by_tile[slice_tile]
        epi = (c["epilogue"] + rounds * c["round"]) * c["warps"] / (bm * bn) / issue
        efficiency = mma_efficiency(bm, bn)
        fractions = {}
        for name, d, _, rows in SHAPES:
            gemm = 2 * d / GEMM_FLOPS
            mma = 2 * d / (PEAK_FLOPS * efficiency)
            mixture = MIXTURE_GEMMS * gemm / rows
            fractions[name] = {"serial": round(gemm / (mma + epi + mixture), 2)}
            if c["ctas_per_sm"] >= 2:
                fractions[name]["overlapped"] = round(gemm / (max(mma, epi) + mixture), 2)
        out.append(
            {
                **c,
                "rounds_per_tile": round(rounds, 3),
                "epilogue_ps_per_logit": round(epi * 1e12, 2),
                "mma_efficiency": round(efficiency, 3),
                "fraction_of_cublas": fractions,
            }
        )
    return out


def slot_padding(rows_per_token: int) -> float:
    """Slots per lens row of the fused kernel's KL layout (a final-layer slot in every row block,
    ``lens_triton._plan_layout``; the last layer is the reference): 29 rows -> 32 slots."""
    from codelens.kernels.lens_triton import _plan_layout

    layout = _plan_layout(rows_per_token, BLOCK_M, kl=True, final_shared=True)
    return layout.groups * layout.lb / rows_per_token


def instructions_per_logit(sizes: dict[str, int], rounds: float) -> float:
    """Warp instructions per logit of a kernel step (a fused tile or a fold column step) that
    runs ``rounds`` insertion rounds."""
    step = sizes["epilogue"] + rounds * sizes["round"]
    return step * sizes["warps"] / (sizes["rows"] * sizes["columns"])


def predicted_fractions(fused_rounds: float, fold_rounds: float, sizes: dict) -> dict[str, Any]:
    """Predicted fraction of the cuBLAS bf16 matmul per model shape, from instruction counts:

    * cuBLAS: ``2 d`` FLOP per logit at ``GEMM_FLOPS`` (achieved, not peak);
    * fused (KL from the final layer's mixture, the default): its MMA at peak times
      ``FUSED_MMA_EFFICIENCY`` plus its epilogue without KL, not overlapped (one CTA per SM),
      plus the mixture's ``MIXTURE_GEMMS`` cuBLAS passes over the final rows per token, shared by
      the token's ``rows`` lens rows;
    * fused-slot-kl: MMA and the epilogue with KL, over the slot layout's padded rows;
    * chunked: the cuBLAS GEMM plus the fold kernel's instructions (its 8 bytes per logit of
      traffic take less: ~1.2-2 ps per logit from L2/HBM, kernels/DESIGN.md).
    """
    issue = SMS * SCHEDULERS * CLOCK_HZ  # warp instructions per second, whole GPU
    fused_epi = instructions_per_logit(sizes["triton-fused"], fused_rounds) / issue
    slot_epi = instructions_per_logit(sizes["triton-fused-slot-kl"], fused_rounds) / issue
    fold = instructions_per_logit(sizes["triton-chunked"], fold_rounds) / issue
    out = {}
    for name, d, _, rows in SHAPES:
        gemm = 2 * d / GEMM_FLOPS
        mma = 2 * d / (PEAK_FLOPS * FUSED_MMA_EFFICIENCY)
        fused = mma + fused_epi + MIXTURE_GEMMS * gemm / rows
        slot = (mma + slot_epi) * slot_padding(rows)
        out[name] = {
            "fused": round(gemm / fused, 2),
            "fused_slot_kl": round(gemm / slot, 2),
            "chunked": round(gemm / (gemm + fold), 2),
        }
    return {
        "fused_epilogue_ps_per_logit": round(fused_epi * 1e12, 2),
        "fused_slot_kl_epilogue_ps_per_logit": round(slot_epi * 1e12, 2),
        "fold_ps_per_logit": round(fold * 1e12, 2),
        "fraction_of_cublas": out,
    }


def summarise(
    counts: dict[str, torch.Tensor], sizes: dict[str, dict[str, int]] | None
) -> dict[str, Any]:
    """Rounds per tile (first tiles of a chunk, later ones, all) and, with ``sizes``, the fused
    epilogue's microseconds per tile."""
    first, later = counts["first"], ~counts["first"]
    out: dict[str, Any] = {}
    for name, mask in (("first_tile", first), ("later_tiles", later), ("all_tiles", first | later)):
        worst, mean = counts["worst"][mask], counts["mean"][mask]
        out[name] = {
            "tiles": int(mask.sum()),
            "fused_rounds_per_tile": round(worst.mean().item(), 3),
            "mean_row_insertions_per_tile": round(mean.mean().item(), 3),
            "worst_over_mean": round(worst.sum().item() / max(mean.sum().item(), 1e-9), 2),
        }
        if sizes:
            fused = sizes["triton-fused"]
            warp_instructions = fused["epilogue"] + worst.mean().item() * fused["round"]
            us = warp_instructions * fused["warps"] / SCHEDULERS / CLOCK_HZ * 1e6
            out[name]["fused_epilogue_us_per_tile"] = round(us, 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="lens rows per source")
    parser.add_argument(
        "--sources", nargs="+", default=["bundled", "synthetic", "forward"],
        choices=["bundled", "synthetic", "forward"],
    )  # fmt: skip
    parser.add_argument(
        "--sm90",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "kernel_sm90.json",
        help="loop sizes of the default fused kernel (bench_kernel.py --compile-only --sweep)",
    )
    parser.add_argument(
        "--tiles",
        nargs="*",
        default=["64x128", "128x64", "64x64", "64x256", "128x256"],
        help="other BLOCK_MxBLOCK_N tiles to count rounds for (a round's cost scales with the "
        "tile's area and the tiles per logit inversely, so rounds per tile compare directly)",
    )
    parser.add_argument(
        "--chunks",
        nargs="*",
        type=int,
        default=[16384, 65536],
        help="other vocabulary chunk sizes to count the fused kernel's rounds for (a chunk's state "
        "restarts empty: its first tiles take the most rounds)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if any(c < BLOCK_N or c % BLOCK_N for c in args.chunks):
        parser.error(f"--chunks {args.chunks}: each a multiple of the tile width {BLOCK_N}")
    tiles = []
    for tile in args.tiles:
        try:
            bm, bn = (int(x) for x in tile.split("x"))
        except ValueError:
            parser.error(f"--tiles {tile!r}: write a tile as BLOCK_MxBLOCK_N, e.g. 64x256")
        tiles.append((tile, bm, bn))
    # Rows are cut to whole row blocks: fewer than one block of the tallest tile counts nothing.
    tallest = max([BLOCK_M, *(bm for _, bm, _ in tiles)])
    if args.rows < tallest:
        parser.error(f"--rows {args.rows}: at least {tallest} (one row block of the tallest tile)")
    torch.manual_seed(0)

    results: dict[str, Any] = {"k": K, "block_m": BLOCK_M, "block_n": BLOCK_N}
    results["vocab_chunk"] = VOCAB_CHUNK
    sizes = sm90_loop_sizes(args.sm90)
    results["sm90_instructions_per_warp"] = sizes
    results["mma_us_per_tile_at_peak"] = {
        name: round(2 * BLOCK_M * BLOCK_N * d / (PEAK_FLOPS / SMS) * 1e6, 2)
        for name, d, _, _ in SHAPES
    }
    results["sources"] = {}
    for source in args.sources:
        logits, what = (
            bundled_logits(args.rows) if source == "bundled" else problem_logits(source, args.rows)
        )
        summary = summarise(tile_rounds(logits, K), sizes)
        by_tile = {f"{BLOCK_M}x{BLOCK_N}": summary["all_tiles"]["fused_rounds_per_tile"]}
        for tile, bm, bn in tiles:
            counts = tile_rounds(logits[: logits.shape[0] // bm * bm], K, bm, bn)
            by_tile[tile] = round(counts["worst"].mean().item(), 3)
        summary["fused_rounds_per_tile_by_tile"] = by_tile
        by_chunk = {VOCAB_CHUNK: summary["all_tiles"]["fused_rounds_per_tile"]}
        for chunk in args.chunks:
            by_chunk[chunk] = round(
                tile_rounds(logits, K, vocab_chunk=chunk)["worst"].mean().item(), 3
            )
        summary["fused_rounds_per_tile_by_chunk"] = by_chunk
        # The fold kernel: one row per program, its state over the whole vocabulary.
        fold = tile_rounds(logits, K, 1, FOLD_COLUMNS, logits.shape[1])
        summary["fold_rounds_per_step"] = round(fold["worst"].mean().item(), 3)
        if sizes:
            summary["prediction"] = predicted_fractions(
                summary["all_tiles"]["fused_rounds_per_tile"],
                summary["fold_rounds_per_step"],
                sizes,
            )
            summary["prediction"]["fused_candidates"] = predicted_candidates(
                by_tile, sm90_fused_candidates(args.sm90)
            )
        results["sources"][source] = {"rows": what, **summary}
        print(source, json.dumps(summary), flush=True)
    results.update(provenance("benchmarks/bench_topk_rounds.py", argv or sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "topk_rounds.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "topk_rounds.md").write_text(markdown(results))
    return results


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Top-k insertion rounds of the fused kernel, counted on real logits",
        "",
        f"k {r['k']}, tiles {r['block_m']} x {r['block_n']}, vocabulary chunks of "
        f"{r['vocab_chunk']}; counted exactly with `torch.topk` (no kernel). *Fused rounds*: the "
        "block's worst row per tile (what the fused kernel runs); *mean row*: what a per-row "
        "insertion runs. The cross-chunk bound is left out, so fused rounds are an upper bound.",
        "",
        "| rows | tiles | fused rounds / tile | mean row / tile | worst / mean |"
        + (" fused epilogue µs / tile |" if r["sm90_instructions_per_warp"] else ""),
        "|---|---|---|---|---|" + ("---|" if r["sm90_instructions_per_warp"] else ""),
    ]
    for source in r["sources"].values():
        for name in ("first_tile", "later_tiles", "all_tiles"):
            s = source[name]
            row = (
                f"| {source['rows']}: {name.replace('_', ' ')} | {s['tiles']} | "
                f"{s['fused_rounds_per_tile']} | {s['mean_row_insertions_per_tile']} | "
                f"{s['worst_over_mean']} |"
            )
            if r["sm90_instructions_per_warp"]:
                row += f" {s['fused_epilogue_us_per_tile']} |"
            lines.append(row)
    tiles = list(next(iter(r["sources"].values()))["fused_rounds_per_tile_by_tile"])
    lines += [
        "",
        "Fused rounds per tile over all tiles, by tile shape (a round's cost grows with the tile's "
        "area and the tiles per logit shrink with it, so these compare directly):",
        "",
        "| rows | " + " | ".join(tiles) + " |",
        "|---|" + "---|" * len(tiles),
    ]
    for source in r["sources"].values():
        by_tile = source["fused_rounds_per_tile_by_tile"]
        lines.append(f"| {source['rows']} | " + " | ".join(str(by_tile[t]) for t in tiles) + " |")
    chunks = list(next(iter(r["sources"].values()))["fused_rounds_per_tile_by_chunk"])
    lines += [
        "",
        f"Fused rounds per {r['block_m']}x{r['block_n']} tile over all tiles, by vocabulary chunk "
        "(`LensTritonConfig.vocab_chunk`: the state restarts empty in every chunk, so longer "
        "chunks restart less often; the grid has V / chunk programs per row block):",
        "",
        "| rows | " + " | ".join(f"chunk {c}" for c in chunks) + " |",
        "|---|" + "---|" * len(chunks),
    ]
    for source in r["sources"].values():
        by_chunk = source["fused_rounds_per_tile_by_chunk"]
        lines.append(f"| {source['rows']} | " + " | ".join(str(by_chunk[c]) for c in chunks) + " |")
    sizes = r["sm90_instructions_per_warp"]
    if sizes:
        fused, fold = sizes["triton-fused"], sizes["triton-chunked"]
        models = list(r["mma_us_per_tile_at_peak"])
        lines += [
            "",
            f"Fused epilogue per tile = {fused['epilogue']} + rounds x {fused['round']} SASS "
            "instructions per warp (the default kernel's tile loop less its K loop, and its "
            "insertion loop, from `kernel_sm90.json`); µs = instructions x 8 warps / 4 schedulers "
            "/ 1.755 GHz, not overlapped with the MMA (one CTA per SM). The tile's MMA at dense "
            "bf16 peak (989 TFLOP/s over 132 SMs), µs: "
            + ", ".join(f"{k} {v}" for k, v in r["mma_us_per_tile_at_peak"].items())
            + ".",
            "",
            "## Predicted fraction of the cuBLAS bf16 matmul",
            "",
            f"From instruction counts: the fused kernel's MMA at peak x {FUSED_MMA_EFFICIENCY} "
            "plus its epilogue. *fused*: KL from the final layer's mixture (the kernel without "
            f"KL, plus {MIXTURE_GEMMS} cuBLAS passes over each token's final row, shared by its "
            "lens rows); *slot KL*: KL in the epilogue "
            f"({sizes['triton-fused-slot-kl']['epilogue']} instead of {fused['epilogue']} per "
            "tile) over the slot layout's padded rows (a final-layer slot in every row block: "
            + ", ".join(
                f"{n} rows -> {round(slot_padding(n) * n)} slots"
                for n in sorted({rows for _, _, _, rows in SHAPES})
            )
            + "). The chunked strategy's cuBLAS GEMM (at "
            f"{GEMM_FLOPS / 1e12:.0f} TFLOP/s, as the bound) plus its fold kernel "
            f"({fold['epilogue']} + rounds x {fold['round']} instructions per warp and "
            f"{fold['columns']}-column step of one row, {fold['warps']} warps). The fold's rounds "
            "are its row's own, its state running over the whole vocabulary (the bundled model's "
            "vocabulary is 4,096: four fold steps, the first of which takes k rounds, so its fold "
            "figures overstate a large vocabulary's). Issue time only: memory traffic and the "
            "MMA's own efficiency beyond the factor above are not modelled. Predictions, not "
            "measurements: `benchmarks/gpu_check.sh` measures them on a GPU.",
            "",
            "| rows | fused rounds / tile | fold rounds / step | fused epilogue ps / logit | "
            "fold ps / logit | "
            + " | ".join(f"{m} fused / slot KL / chunked" for m in models)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(models),
        ]
        for source in r["sources"].values():
            p = source["prediction"]
            cells = [
                " / ".join(
                    str(p["fraction_of_cublas"][m][strategy])
                    for strategy in ("fused", "fused_slot_kl", "chunked")
                )
                for m in models
            ]
            lines.append(
                f"| {source['rows']} | {source['all_tiles']['fused_rounds_per_tile']} | "
                f"{source['fold_rounds_per_step']} | {p['fused_epilogue_ps_per_logit']} | "
                f"{p['fold_ps_per_logit']} | " + " | ".join(cells) + " |"
            )
        lines += candidates_markdown(r, models)
    return "\n".join([*lines, "", *provenance_markdown(r), ""])


def candidates_markdown(r: dict[str, Any], models: list[str]) -> list[str]:
    """The fused candidates' predictions, one table per source of rows."""
    lines = [
        "",
        "## Fused candidates: CTAs per SM and the predicted fraction of cuBLAS",
        "",
        "Every fused configuration of `kernel_sm90.json` without KL in its epilogue, at its tile's "
        "counted rounds. *CTAs / SM*: what its registers (allocated per warp in units of 256), "
        "warps and shared memory let an H100/H200 SM hold at once; with two, one CTA's epilogue "
        "can run under the other's MMA. MMA efficiency: L2-bound, in proportion to the tile's "
        f"reuse (BM BN / (BM + BN)), {FUSED_MMA_EFFICIENCY} at 128x128, at most "
        f"{MAX_MMA_EFFICIENCY}. Each shape: *serial* (MMA + epilogue), and with two CTAs per SM "
        "*serial - overlapped* (the larger of the two: a bound a device can approach). Spills "
        "count as issued instructions only (their trips to local memory are not priced), so a "
        "spilling candidate is predicted too well.",
    ]
    for source in r["sources"].values():
        candidates = source.get("prediction", {}).get("fused_candidates")
        if not candidates:
            continue
        lines += [
            "",
            f"{source['rows']}:",
            "",
            "| tile x BK, warps, stages, sub-tiles | CTAs / SM | spill stores | rounds / tile | "
            "epilogue ps / logit | MMA efficiency | " + " | ".join(models) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(models),
        ]
        for c in candidates:
            cells = [
                " - ".join(str(v) for v in c["fraction_of_cublas"][m].values()) for m in models
            ]
            lines.append(
                f"| {c['tile']}x{c['block_k']}, {c['warps']}, {c['stages']}, {c['subtiles']} | "
                f"{c['ctas_per_sm']} | {c['spill_stores']} | {c['rounds_per_tile']} | "
                f"{c['epilogue_ps_per_logit']} | {c['mma_efficiency']} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


if __name__ == "__main__":
    main()
