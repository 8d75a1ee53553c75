"""Throughput of the fused Triton lens kernel against the bf16 matmul of the same shape.

The lens over ``rows = layers x tokens`` residual rows costs one ``[rows, d] x [d, V]`` product
(``2 * rows * d * V`` FLOP) plus its epilogue; ``torch.matmul`` of that shape in bf16 (cuBLAS,
writing the ``[rows, V]`` logits the kernel never materialises) is the bound. Every statistic is
on: k = 10, two look-ahead columns, ``kl_final``, entropy and one token set. Target (the issue):
>= 75 % of the matmul's throughput at d >= 3584 and >= 50 % at d = 1536 on an H100/H200.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/bench_kernel.py             # all models, rows 8k..64k
    python benchmarks/bench_kernel.py --check     # correctness at a production shape first
    python benchmarks/bench_kernel.py --models qwen7b --rows 32768 --block-n 256 --num-stages 3

Writes ``benchmarks/results/kernel-<device>-<UTC time>.json`` and ``.md`` (device, versions, the
exact command, the time and one row per shape). Without a CUDA device it prints why and exits 0;
``--compile-only`` then still compiles the main kernel for sm_90 and reports its shared memory,
spill instructions, registers, SASS size and whether it uses wgmma (a static check that needs no
GPU); ``--compile-only --sweep`` does so for every ``SWEEP_CONFIGS`` candidate and writes
``benchmarks/results/kernel_sm90.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from codelens.kernels import FinalNorm, Head, LensRequest, NormKind, lens_stats_torch

# d_model, vocabulary rows and lens layers (blocks + the embedding output) of each model.
MODELS = {
    "gpt2": ("GPT-2", 768, 50257, 13),
    "qwen1.5b": ("Qwen2.5-Coder-1.5B", 1536, 151936, 29),
    "codellama7b": ("CodeLlama-7B", 4096, 32016, 33),
    "qwen7b": ("Qwen2.5-Coder-7B", 3584, 152064, 29),
    # The CPU smoke run's shape (``--device cpu``: the kernels in Triton's interpreter).
    "tiny": ("tiny (CPU smoke run)", 64, 1000, 3),
}
GPU_MODELS = ("gpt2", "qwen1.5b", "codellama7b", "qwen7b")
MAIN_STRATEGIES = ("triton-fused", "triton-chunked")
DEFAULT_ROWS = (8192, 16384, 32768, 65536)
RESULTS = Path(__file__).resolve().parent / "results"
K, LOOKAHEAD = 10, 2


class _IdentityNorm(FinalNorm):
    """For ``--check``: rows that are already normalised (and rounded) go through unchanged."""

    def apply(self, h: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return h.to(dtype)


def make_problem(d: int, V: int, n_layers: int, n_tokens: int, device: str, seed: int = 0):
    """A bf16 RMSNorm head with bias-free ``W_U`` and residual rows whose norm grows with depth."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(V, d, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(d, generator=gen, device=device)).to(torch.bfloat16)
    head = Head(FinalNorm(NormKind.RMS, norm_w, None, 1e-6), w)
    scale = torch.linspace(0.5, 8.0, n_layers, device=device)[:, None, None]
    hidden = (torch.randn(n_layers, n_tokens, d, generator=gen, device=device) * scale).to(
        torch.bfloat16
    )
    targets = torch.randint(0, V, (n_tokens, 1 + LOOKAHEAD), generator=gen, device=device)
    for j in range(1 + LOOKAHEAD):
        targets[n_tokens - 1 - j :, j] = -1
    token_set = torch.randperm(V, generator=gen, device=device)[:512]
    request = LensRequest(k=K, entropy=True, kl_final=True, token_sets=(("set", token_set),))
    return hidden, head, targets, request


def forward_problem(d: int, V: int, n_layers: int, n_tokens: int, device: str, seed: int = 0):
    """``make_problem`` with the residual rows of a real forward: a random-weight two-block
    Llama of width ``d`` and vocabulary ``V`` (transformers' own init), its three residual streams
    (embedding, block 1, block 2) cycled over ``n_layers`` lens layers, read through its own final
    norm and LM head. Random weights give near-uniform logits: close to the worst case for the
    top-k insertion (every chunk has fresh candidates)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, d // 128)
    config = LlamaConfig(
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=V,
        max_position_embeddings=max(4096, n_tokens),
    )
    with torch.device(device):  # built where it runs: a 152k x 3584 init is slow on a CPU
        model = LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
    ids = torch.randint(0, V, (1, n_tokens), device=device)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states  # 3 x [1, T, d]
    hidden = torch.stack([states[layer % len(states)][0] for layer in range(n_layers)])
    norm = model.model.norm
    head = Head(
        FinalNorm(NormKind.RMS, norm.weight.detach(), None, norm.variance_epsilon),
        model.lm_head.weight.detach(),
    )
    targets = torch.randint(0, V, (n_tokens, 1 + LOOKAHEAD), device=device)
    for j in range(1 + LOOKAHEAD):
        targets[n_tokens - 1 - j :, j] = -1
    token_set = torch.randperm(V, device=device)[:512]
    request = LensRequest(k=K, entropy=True, kl_final=True, token_sets=(("set", token_set),))
    return hidden.contiguous(), head, targets, request


PROBLEMS = {"synthetic": make_problem, "forward": forward_problem}


FUSED_VARIANTS = {
    # A benchmark name for the fused kernel at a candidate configuration (sm_90 offline figures
    # from kernel_sm90.json, predictions from topk_rounds.md). BLOCK_N 256 with the epilogue in
    # two column slices: 99 spill stores (442 unsliced), twice the reuse of W per A block; the
    # best single-CTA prediction if its MMA reaches the 0.85 of peak that 128x256 tiles allow.
    "triton-fused-n256": {"block_n": 256, "block_k": 32, "num_stages": 4, "epilogue_subtiles": 2},
    # 128x64 at 4 warps: two CTAs per SM (255 registers x 4 warps, 72 KiB of shared memory each),
    # so one CTA's epilogue can run under the other's MMA; 4 spill stores, a quarter fewer
    # insertion rounds per logit, two thirds of the 128x128 tile's reuse.
    "triton-fused-n64": {"block_n": 64, "num_warps": 4},
    # Longer vocabulary chunks: the top-k state restarts empty in every chunk, so a 16384-column
    # chunk runs 2.3 insertion rounds per tile on i.i.d. logits against 3.9 (topk_rounds.md);
    # at V = 152k a group of row blocks still spans ~9 chunks (the same L2 reuse of A blocks),
    # at V = 32k only 2 (A blocks of ~66 row blocks in flight: more than L2 holds).
    "triton-fused-c16384": {"vocab_chunk": 16384},
    # KL in the kernel's epilogue against a final-layer slot per row block (the layout before the
    # final layer's mixture): 10 to 21 % more MMA at these shapes, 1,045 more SASS per tile.
    "triton-fused-slot-kl": {"kl_by_mixture": False},
    # No spills at the 128x128 tile's area, one CTA per SM; predicted slower: 256-wide rows take
    # 4.8 insertion rounds per tile against 3.9 on i.i.d. logits, at 663 instructions a round.
    "triton-fused-m64n256": {"block_m": 64, "block_n": 256},
}
"""Candidate configurations timed beside the defaults: if one wins, ``LensTritonConfig``'s
defaults should become it (the strategy names of ``lens.impl`` stay ``triton-fused`` etc.)."""

CHUNKED_VARIANTS = {
    # The fold kernel in 2048-column steps: 0.54 instead of 0.61 SASS instructions per column and
    # warp (kernel_sm90.json), at 127 registers instead of 64 (half the resident CTAs per SM).
    "triton-chunked-v2048": {"fold_block_v": 2048},
    # Taller GEMM blocks: a quarter of the launches per batch (2048 rows is 70 tokens of a
    # 29-layer model, 38 cuBLAS calls and 38 fold launches per block at V = 152k, close to
    # launch-bound at d = 1536), a 128 MiB buffer instead of 32.
    "triton-chunked-r8192": {"rows_per_gemm": 8192},
}
"""The same for the chunked strategy (``LensChunkedConfig`` fields)."""


def strategy_fn(strategy: str, config):
    """The lens function of ``strategy`` (``config`` applies to the fused kernel; a
    ``FUSED_VARIANTS`` or ``CHUNKED_VARIANTS`` name replaces some of its kernel's fields)."""
    if strategy == "triton-fused" or strategy in FUSED_VARIANTS:
        from codelens.kernels.lens_triton import lens_stats_triton

        config = dataclasses.replace(config, **FUSED_VARIANTS.get(strategy, {}))
        return lambda *a, **kw: lens_stats_triton(*a, config=config, **kw)
    from codelens.kernels.lens_chunked import LensChunkedConfig, lens_stats_chunked

    fields = CHUNKED_VARIANTS.get(strategy)
    chunked = LensChunkedConfig(**fields) if fields else None  # None: the device's default
    return lambda *a, **kw: lens_stats_chunked(*a, config=chunked, **kw)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = a.isfinite() & b.isfinite()
    return (a[ok].double() - b[ok].double()).abs().max().item() if ok.any() else 0.0


def check(model: str, n_tokens: int, config, device: str, strategy: str = "triton-fused") -> dict:
    """Kernel vs ``lens_stats_torch`` at a production shape: a report with ``passed`` and, when
    it did not, ``failures`` (what differs, one line each).

    Two comparisons: ``precision="fp32"`` against the torch path on the raw rows (same accuracy
    class: tight), and the default bf16 path against the torch path fed the kernel's own rounded
    rows through an identity norm (isolates the kernel's arithmetic from the bf16 rounding of the
    normalised rows, which it shares with the model's own head). Plus bitwise determinism.
    """
    from codelens.kernels.norm_stage import normalized_rows

    run = strategy_fn(strategy, config)
    name, d, V, n_layers = MODELS[model]
    hidden, head, targets, request = make_problem(d, V, n_layers, n_tokens, device, seed=1)
    final = hidden[-1]
    fields = (
        "lse",
        "entropy",
        "kl_final",
        "target_logprob",
        "ahead_logprob",
        "topk_logprobs",
        "set_logmass",
    )
    report: dict = {"model": name, "strategy": strategy, "rows": n_layers * n_tokens}

    exact = run(hidden, head, targets, request, final, precision="fp32")
    # The torch path with the head widened to fp32: IEEE fp32 on any device (on a GPU it would
    # otherwise multiply the bf16 head in bf16, rows rounded, like the model's own lm_head).
    fp32_head = dataclasses.replace(head, unembed=head.unembed.float())
    ref = lens_stats_torch(hidden, fp32_head, targets, request, final)
    report["fp32_vs_torch"] = {f: _max_err(getattr(exact, f), getattr(ref, f)) for f in fields}

    fast = run(hidden, head, targets, request, final)
    xs = normalized_rows(hidden.reshape(-1, d), head).view(n_layers, n_tokens, d)
    staged = dataclasses.replace(head, norm=_IdentityNorm(NormKind.RMS, None, None, 0.0))
    ref_staged = lens_stats_torch(xs, staged, targets, request, xs[-1])
    report["bf16_vs_staged_torch"] = {
        f: _max_err(getattr(fast, f), getattr(ref_staged, f)) for f in fields
    }
    report["bf16_vs_raw_torch"] = {f: _max_err(getattr(fast, f), getattr(ref, f)) for f in fields}
    # Ranks and top-k ids: equal to the staged reference except against entries whose logits lie
    # within a rounding band of each other (fp32 dot products of length d in another order).
    band = 1e-4
    z = staged.logits(xs.float())  # [L, T, V] fp32: 1.7 GB at the default check shape
    tgt = targets.long()
    zt = z.gather(-1, tgt.clamp_min(0).expand(n_layers, -1, -1))  # [L, T, 1 + A]
    n_close = torch.stack(
        [((z - zt[..., c : c + 1]).abs() <= band).sum(-1) - 1 for c in range(tgt.shape[1])], -1
    )
    ranks = torch.cat([fast.target_rank[..., None], fast.ahead_rank], -1).long()
    want = torch.cat([ref_staged.target_rank[..., None], ref_staged.ahead_rank], -1).long()
    has = (tgt >= 0).expand_as(ranks)
    report["rank_mismatch_fraction"] = (ranks != want)[has].float().mean().item()
    report["rank_mismatch_outside_band"] = int(((ranks - want).abs() > n_close)[has].sum())
    at_got = z.gather(-1, fast.topk_ids.long())
    at_want = z.gather(-1, ref_staged.topk_ids.long())
    id_mismatch = fast.topk_ids != ref_staged.topk_ids
    report["topk_id_mismatch_fraction"] = id_mismatch.float().mean().item()
    report["topk_value_gap_at_mismatch"] = (at_got - at_want).abs().max().item()
    del z

    again = run(hidden, head, targets, request, final)
    report["deterministic"] = all(
        torch.equal(a.view(torch.int32), b.view(torch.int32))
        if a.is_floating_point()
        else torch.equal(a, b)
        for a, b in (
            (getattr(fast, f.name), getattr(again, f.name)) for f in dataclasses.fields(fast)
        )
        if a is not None
    )
    failures = [
        message
        for failed, message in (
            (not report["deterministic"], "two runs differ"),
            (max(report["fp32_vs_torch"].values()) >= 2e-3, "fp32 kernel differs from torch"),
            (max(report["bf16_vs_staged_torch"].values()) >= 2e-3, "bf16 arithmetic is off"),
            (report["rank_mismatch_outside_band"] > 0, "ranks differ beyond rounding ties"),
            (report["topk_value_gap_at_mismatch"] > band, "top-k ids differ beyond ties"),
        )
        if failed
    ]
    report["passed"] = not failures
    if failures:
        report["failures"] = failures
    print(json.dumps(report, indent=2), flush=True)
    return report


def wall_clock_timer(fn, warmup: int = 0, rep: int = 0, quantiles=None) -> float | list[float]:
    """``triton.testing.do_bench`` from the host clock: the CPU smoke run's timer (no CUDA
    events; ``warmup``/``rep`` are ignored: one warm-up, five runs). Its answer has do_bench's
    form, so the smoke run meets what the GPU run meets: the mean (ms) without ``quantiles``,
    else a list of those quantiles (a single float for one quantile, as do_bench returns)."""
    fn()  # the interpreter parses each kernel on its first call
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    if quantiles is None:
        return sum(times) / len(times)
    picked = torch.quantile(torch.tensor(times), torch.tensor(quantiles)).tolist()
    return picked[0] if len(picked) == 1 else picked


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


class ShapeBench:
    """One (model, rows) shape's inputs and its cuBLAS bf16 matmul bound, built on first use and
    kept for the strategies timed after it."""

    def __init__(self, model: str, rows_target: int, device: str, source: str, timer, timing):
        name, d, V, n_layers = MODELS[model]
        n_tokens = max(1, round(rows_target / n_layers))
        rows = n_layers * n_tokens
        self.device, self.timer, self.timing = device, timer, timing
        self.flop = 2.0 * rows * d * V
        self.problem = PROBLEMS[source](d, V, n_layers, n_tokens, device)
        self.info = {"model": name, "d": d, "V": V, "layers": n_layers, "tokens": n_tokens}
        self.info |= {"rows": rows, "rows_source": source}
        self.bound = self._matmul_bound()

    def _matmul_bound(self) -> dict:
        """``torch.matmul`` of the rows by ``W_U^T`` into bf16 ``[rows, V]`` logits."""
        hidden, head, _, _ = self.problem
        x = hidden.reshape(-1, hidden.shape[-1])
        w_t = head.unembed.T  # [d, V] view: cuBLAS handles the transposed operand
        try:
            logits = torch.empty(x.shape[0], head.unembed.shape[0], dtype=x.dtype, device=x.device)
            ms = self.timer(
                lambda: torch.matmul(x, w_t, out=logits), **self.timing, quantiles=[0.5, 0.2, 0.8]
            )
        except torch.OutOfMemoryError:
            return {"matmul_ms": None, "matmul_tflops": None}
        finally:
            logits = None  # the [rows, V] logits are not kept for the strategies
            if self.device == "cuda":
                torch.cuda.empty_cache()
        return {"matmul_ms": ms[0], "matmul_tflops": self.flop / (ms[0] * 1e-3) / 1e12}

    def time(self, strategy: str, config) -> dict:
        """One strategy's timing (an ``error`` instead when it raised)."""
        hidden, head, targets, request = self.problem
        result = {**self.info, "strategy": strategy, **self.bound}
        try:
            run = strategy_fn(strategy, config)
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = self.timer(
                lambda: run(hidden, head, targets, request, hidden[-1]),
                **self.timing,
                quantiles=[0.5, 0.2, 0.8],
            )
        except Exception as exc:  # noqa: BLE001 (recorded; the other strategies still run)
            if self.device == "cuda":
                torch.cuda.empty_cache()
            return {**result, "error": _error(exc)}
        result["kernel_ms"], result["kernel_ms_p20"], result["kernel_ms_p80"] = ms
        result["kernel_tflops"] = self.flop / (ms[0] * 1e-3) / 1e12
        result["kernel_peak_mem_gb"] = (
            torch.cuda.max_memory_allocated() / 1e9 if self.device == "cuda" else None
        )
        mm = result["matmul_tflops"]
        result["fraction_of_matmul"] = None if mm is None else result["kernel_tflops"] / mm
        return result


def strategy_groups(strategies) -> list[list[str]]:
    """The order things are checked and timed in: the two strategies the default is chosen
    between, shape by shape together, then each candidate configuration on its own, so that a
    budget that runs out leaves the choice that matters measured."""
    main = [s for s in MAIN_STRATEGIES if s in strategies]
    rest = [[s] for s in strategies if s not in MAIN_STRATEGIES]
    return ([main] if main else []) + rest


def run_all(
    models,
    rows_targets,
    strategies,
    config,
    device: str,
    source: str,
    timer,
    timing: dict,
    check_model: str | None,
    check_tokens: int,
    deadline: float,
    on_update,
) -> dict:
    """Check (when ``check_model``) and time every strategy at every shape, in
    ``strategy_groups`` order, until ``deadline`` (``time.monotonic()``).

    A strategy that fails its check, or raises there, is not timed; one that raises while timed
    has an ``error`` in its result; nothing stops the others. ``on_update(record)`` is called
    after every check and timing with ``{"checks", "results", "skipped"}`` so far (the caller
    writes it: a run stopped from outside keeps what it measured).
    """
    record: dict = {"checks": [], "results": [], "skipped": []}
    shapes: dict[tuple[str, int], ShapeBench] = {}
    for group in strategy_groups(strategies):
        live = []
        for strategy in group:
            if check_model is None:
                live.append(strategy)
                continue
            if time.monotonic() > deadline:
                record["skipped"].append({"strategy": strategy, "what": "check", "why": "budget"})
                continue
            try:
                report = check(check_model, check_tokens, config, device, strategy)
            except Exception as exc:  # noqa: BLE001 (recorded; the other strategies still run)
                report = {"strategy": strategy, "passed": False, "failures": [_error(exc)]}
            record["checks"].append(report)
            if report["passed"]:
                live.append(strategy)
            on_update(record)
        for model in models:
            for rows in rows_targets:
                for strategy in live:
                    if time.monotonic() > deadline:
                        record["skipped"].append(
                            {"strategy": strategy, "model": model, "rows": rows, "why": "budget"}
                        )
                        continue
                    if (model, rows) not in shapes:
                        shapes[model, rows] = ShapeBench(model, rows, device, source, timer, timing)
                    result = shapes[model, rows].time(strategy, config)
                    record["results"].append(result)
                    _print_result(result)
                    on_update(record)
    return record


def _print_result(r: dict) -> None:
    head = f"{r['model']:>20s} {r['strategy']:>22s} rows={r['rows']:>6d}:"
    if "error" in r:
        print(f"{head} {r['error']}", flush=True)
        return
    frac = r["fraction_of_matmul"]
    print(
        f"{head} {r['kernel_ms']:8.2f} ms {r['kernel_tflops']:6.0f} TFLOP/s | matmul "
        f"{r['matmul_tflops'] or float('nan'):6.0f} TFLOP/s | "
        f"{'n/a' if frac is None else f'{100 * frac:.1f} %'}",
        flush=True,
    )


def choose_defaults(results: list[dict]) -> list[dict]:
    """Per model width: the strategy with the smallest mean time over the width's shapes (what
    ``kernels/dispatch.py``'s ``STRATEGY_BY_WIDTH`` should say), among the strategies timed
    without error at every one of them. A ``FUSED_VARIANTS`` or ``CHUNKED_VARIANTS`` winner is
    reported as its strategy with the config fields it changes."""
    by_width: dict[int, dict[str, dict[int, float]]] = {}
    shapes: dict[int, set[int]] = {}
    for r in results:
        shapes.setdefault(r["d"], set()).add(r["rows"])
        if "error" not in r:
            timed = by_width.setdefault(r["d"], {}).setdefault(r["strategy"], {})
            timed[r["rows"]] = r["kernel_ms"]
    variants = {name: ("triton-fused", fields) for name, fields in FUSED_VARIANTS.items()}
    variants |= {name: ("triton-chunked", fields) for name, fields in CHUNKED_VARIANTS.items()}
    chosen = []
    for d, times in sorted(by_width.items()):
        complete = {s: t for s, t in times.items() if set(t) == shapes[d]}
        if not complete:
            continue
        best = min(complete, key=lambda s: sum(complete[s].values()) / len(complete[s]))
        strategy, fields = variants.get(best, (best, {}))
        ms = {s: list(t.values()) for s, t in complete.items()}
        chosen.append({"d": d, "strategy": strategy, "config": fields, "ms": ms})
    return chosen


def strategy_by_width(chosen: list[dict]) -> str:
    """``choose_defaults``'s choices as the ``STRATEGY_BY_WIDTH`` literal of ``kernels/dispatch.py``
    (``(largest d_model, strategy)`` rows, first match wins): each measured width up to the next
    one takes its own choice, the widest row covers every larger model, and neighbouring rows with
    the same strategy merge. A candidate configuration's choice names its strategy (its config
    fields belong in ``LensTritonConfig`` / ``LensChunkedConfig``)."""
    names = {"triton-fused": "TRITON_FUSED", "triton-chunked": "TRITON_CHUNKED"}
    rows: list[list] = []
    for c in sorted(chosen, key=lambda c: c["d"]):
        if rows and rows[-1][1] == c["strategy"]:
            rows[-1][0] = c["d"]
        else:
            rows.append([c["d"], c["strategy"]])
    if not rows:
        return "()"
    rows[-1][0] = "1 << 30"
    return "(" + " ".join(f"({d}, LensImpl.{names[s]})," for d, s in rows) + ")"


def compile_only(config) -> dict:
    """Compile the main kernel for sm_90 (no GPU needed): shared memory, wgmma, spill counts.

    Uses Triton's ahead-of-time entry point (``triton.compile`` of an ``ASTSource``) with the
    divisibility hints the JIT would derive at run time (16-byte aligned pointers, ``d`` and the
    strides multiples of 16), so the software pipeliner behaves as on the device.
    """

    from codelens.kernels import lens_triton as lt

    fn = lt._lens_main_kernel
    types = {
        "x_ptr": "*bf16",
        "w_ptr": "*bf16",
        "stride_wv": "i32",
        "b_ptr": "*bf16",
        "setm_ptr": "*fp32",
        "tgt_ptr": "*i32",
        "thr_ptr": "*fp32",
        "tau_ptr": "*fp32",
        "pf_ptr": "*fp32",
        "pcnt_ptr": "*i32",
        "pset_ptr": "*fp32",
        "ptv_ptr": "*fp32",
        "pti_ptr": "*i32",
        "R_pad": "i32",
        "V": "i32",
        "D": "i32",
        "n_chunks": "i32",
        "chunk_tiles": "i32",
        "n_row_blocks": "i32",
        "logit_scale": "fp32",
        "softcap": "fp32",
    }
    constexprs = {
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "GROUP_M": config.group_m,
        "K": 10,
        "KP": 16,
        "C": 1 + LOOKAHEAD,
        "CP": 4,
        "NS": 1,
        "NSP": 1,
        # The benchmark's bf16 head has no soft-cap, so with ``kl_by_mixture`` KL comes from the
        # final layer's mixture and the kernel runs without it, rows packed densely (LB 1).
        "LB": 1 if config.kl_by_mixture else 8,
        "HAS_BIAS": False,
        "HAS_SCALE": False,
        "HAS_SOFTCAP": False,
        "ENTROPY": True,
        "KL": not config.kl_by_mixture,
        "UPCAST": False,
        "EVEN_K": True,
        "DOT_PRECISION": "tf32",
        "SUBTILES": config.epilogue_subtiles,
    }
    return _compile_sm90(
        fn,
        types,
        constexprs,
        aligned_extra=["stride_wv", "D", "R_pad"],
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        config=dataclasses.asdict(config),
    )


def _compile_sm90(fn, types: dict, constexprs: dict, aligned_extra, options: dict, config: dict):
    """``triton.compile`` of ``fn`` for sm_90 with the JIT's divisibility hints (pointers and
    ``aligned_extra`` multiples of 16): shared memory, wgmma, spills, registers, SASS size."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    aligned = [n for n, t in types.items() if t.startswith("*")] + list(aligned_extra)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    start = time.time()
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    result = {
        "config": config,
        "compile_s": round(time.time() - start, 1),
        "shared_bytes": kernel.metadata.shared,
        "wgmma_in_ptx": ptx.count("wgmma.mma_async"),
        "local_memory_decls": re.findall(r"\.local \.align \d+ \.b8 \S+\[(\d+)\]", ptx),
    }
    try:
        from triton.tools.disasm import get_sass

        sass = get_sass(kernel.asm["cubin"])
        result.update(
            hgmma=sass.count("HGMMA"),
            spill_stores=sass.count("STL"),
            spill_loads=sass.count("LDL"),
            # get_sass writes one "CTRL<tab>INSTRUCTION" line per instruction (labels apart).
            sass_instructions=sum("\t" in line for line in sass.splitlines()),
            registers=_registers(kernel.asm["cubin"]),
            **loop_sizes(sass),
        )
    except Exception as exc:  # nvdisasm missing or format change: the PTX facts still stand
        result["sass"] = f"unavailable: {exc}"
    return result


def _listing(sass: str) -> tuple[list[str], dict[str, int], list[tuple[int, str]]]:
    """A ``get_sass`` listing as its instructions, its labels (name -> instruction index) and
    its branches (instruction index, target name)."""
    instructions: list[str] = []
    labels: dict[str, int] = {}
    branches: list[tuple[int, str]] = []
    for line in sass.splitlines():
        if "\t" in line:
            text = line.split("\t", 1)[1]
            # "BRA LBB3" (Triton's listing) or "BRA `(.L_x_3)" (nvdisasm's own).
            target = re.search(r"\bBRA(?:\.\w+)*\s+`?\(?([.\w$]+)\)?", text)
            if target:
                branches.append((len(instructions), target.group(1)))
            instructions.append(text)
        elif re.fullmatch(r"\s*[.\w$]+:\s*", line):
            labels[line.strip()[:-1]] = len(instructions)
    return instructions, labels, branches


def sass_loops(sass: str) -> list[dict]:
    """The loops of a ``get_sass`` listing: every backward branch to a label, as ``{start, end,
    instructions, hgmma}`` (instruction indices, body size, HGMMA instructions inside)."""
    instructions, labels, branches = _listing(sass)
    loops = []
    for end, target in branches:
        start = labels.get(target, end + 1)
        if start <= end:
            body = instructions[start : end + 1]
            loops.append(
                {
                    "start": start,
                    "end": end,
                    "instructions": len(body),
                    "hgmma": sum("HGMMA" in x for x in body),
                }
            )
    return loops


def loop_sizes(sass: str) -> dict:
    """Per-tile SASS of a kernel from its loops: the K loop (the smallest loop with HGMMA), the
    tile loop (the largest one) and the top-k insertion round (loops without HGMMA nested in
    the tile loop, or in the fold kernel's column loop). ``epilogue_per_tile`` is the tile loop
    less its K loop and rounds: what a tile costs besides the MMA when no row inserts.

    A listing that stops early (a branch target label is missing: Triton 3.6's ``get_sass``
    ends at 4,096 instructions) gives ``{"sass_listing_truncated": True}`` and no sizes: its
    instruction count is then a lower bound."""
    _, labels, branches = _listing(sass)
    if any(t.startswith(("LBB", ".L")) and t not in labels for _, t in branches):
        return {"sass_listing_truncated": True}
    loops = [lp for lp in sass_loops(sass) if lp["instructions"] > 8]
    mma = [lp for lp in loops if lp["hgmma"]]
    if mma:
        k_loop = min(mma, key=lambda lp: lp["instructions"])
        tile = max(mma, key=lambda lp: lp["instructions"])
    else:  # the fold kernel: its column loop holds the insertion rounds
        k_loop = None
        tile = max(loops, key=lambda lp: lp["instructions"], default=None)
    if tile is None:
        return {}
    # Nested loops only: a loop that starts inside the tile loop but ends past it is the
    # out-of-line path a warp takes when it diverges in a shuffle reduction (``BRA.DIV``), not a
    # round.
    rounds = [
        lp
        for lp in loops
        if not lp["hgmma"]
        and lp is not tile
        and tile["start"] <= lp["start"] <= lp["end"] <= tile["end"]
    ]
    sizes = {
        "tile_loop_instructions": tile["instructions"],
        "topk_round_instructions": [lp["instructions"] for lp in rounds],
    }
    if k_loop is not None:
        sizes["k_loop_instructions"] = k_loop["instructions"]
    sizes["epilogue_per_tile"] = (
        tile["instructions"]
        - (k_loop["instructions"] if k_loop else 0)
        - sum(lp["instructions"] for lp in rounds)
    )
    return sizes


def compile_fold(config) -> dict:
    """Compile the chunked strategy's fold kernel for sm_90 (no GPU needed), at the benchmark's
    statistics (k 10, two look-ahead offsets, KL, entropy, one token set)."""
    from codelens.kernels import lens_chunked as lc

    fn = lc._fold_chunk_kernel
    types = {
        "z_ptr": "*fp32",
        "ref_ptr": "*i32",
        "b_ptr": "*bf16",
        "setm_ptr": "*fp32",
        "tgt_ptr": "*i32",
        "thr_ptr": "*fp32",
        "st_ptr": "*fp32",
        "cnt_ptr": "*i32",
        "g_ptr": "*fp32",
        "tv_ptr": "*fp32",
        "ti_ptr": "*i32",
        "n_rows": "i32",
        "V": "i32",
        "v0": "i32",
        "n_cols": "i32",
        "logit_scale": "fp32",
        "softcap": "fp32",
    }
    constexprs = {
        "BLOCK_R": config.fold_block_r,
        "BLOCK_V": config.fold_block_v,
        "KP": 16,
        "C": 1 + LOOKAHEAD,
        "CP": 4,
        "NS": 1,
        "NSP": 1,
        "HAS_BIAS": False,
        "HAS_SCALE": False,
        "HAS_SOFTCAP": False,
        "ENTROPY": True,
        "KL": True,
        "TOPK": True,
    }
    return _compile_sm90(
        fn,
        types,
        constexprs,
        aligned_extra=["n_cols", "V"],
        options={"num_warps": config.num_warps},
        config=dataclasses.asdict(config),
    )


SM90_REGISTERS_PER_SM = 65_536
SM90_REGISTER_UNIT = 256  # registers are allocated to a warp in units of 256
SM90_WARPS_PER_SM = 64
SM90_CTAS_PER_SM = 32
SM90_SHARED_PER_SM = 233_472  # 228 KiB
SM90_SHARED_RESERVED_PER_CTA = 1_024  # the system's share of every CTA's shared memory


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """How many CTAs of a kernel an H100/H200 SM holds at once: the least of what its registers
    (``registers`` per thread, allocated per warp in units of 256: 255 registers take 8,192 per
    warp, so 8 warps per SM), its warp slots and its shared memory (each CTA's own plus 1 KiB the
    system keeps) allow. Two or more let one CTA's epilogue run while another's wgmma does."""
    per_warp = -(-registers * 32 // SM90_REGISTER_UNIT) * SM90_REGISTER_UNIT
    by_registers = SM90_REGISTERS_PER_SM // per_warp // num_warps
    by_warps = SM90_WARPS_PER_SM // num_warps
    by_shared = SM90_SHARED_PER_SM // (shared_bytes + SM90_SHARED_RESERVED_PER_CTA)
    return min(by_registers, by_warps, by_shared, SM90_CTAS_PER_SM)


def _registers(cubin: bytes) -> int | None:
    """Registers per thread of the cubin's kernel (``cuobjdump --dump-resource-usage``)."""
    import subprocess
    import tempfile

    from triton.tools.disasm import path_to_cuobjdump

    found = path_to_cuobjdump()  # a path (Triton 3.9), or (path, version) in older releases
    cuobjdump = found[0] if isinstance(found, tuple) else found
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = re.search(r"REG:(\d+)", usage)
    return int(found.group(1)) if found else None


SWEEP_CONFIGS = (
    # (block_m, block_n, block_k, num_warps, num_stages, epilogue_subtiles): the default first,
    # then the candidates the review named (BLOCK_N 256 whole and in two epilogue slices, fewer
    # warps for two CTAs per SM, smaller M tiles).
    (128, 128, 64, 8, 3, 1),
    (128, 128, 64, 4, 3, 1),
    (128, 128, 64, 8, 4, 1),
    (128, 128, 32, 8, 3, 1),
    (64, 128, 64, 4, 3, 1),
    (128, 64, 64, 4, 3, 1),
    (128, 256, 64, 8, 3, 1),
    (128, 256, 64, 8, 3, 2),
    (128, 256, 32, 8, 4, 2),
    (64, 256, 64, 8, 3, 1),
    # Narrow tiles at 8 warps (half the accumulator per thread: no spills, one CTA per SM at
    # 210-255 registers) and 64x64 at 4 warps (no spills, two CTAs per SM, the least reuse).
    (128, 64, 64, 8, 3, 1),
    (64, 128, 64, 8, 3, 1),
    (64, 64, 64, 4, 3, 1),
)


FOLD_SWEEP_CONFIGS = (
    # (fold_block_r, fold_block_v, num_warps): the default first.
    (1, 1024, 4),
    (1, 2048, 4),
    (1, 1024, 2),
    (2, 1024, 4),
    (1, 4096, 8),
)


FUSED_EPILOGUE = (
    "one reduction per target (log-prob from the pre-pass threshold); top-k gated at the exact "
    "running k-th value; no KL (from the final layer's mixture, kernels/final_mixture.py); "
    "insertion rounds over a float-masked candidate tile (-inf off the candidates, no bit-packed "
    "boolean tile), looping while a row's next arg-max is a candidate"
)
"""What the fused kernel's epilogue is at this commit: a sweep keeps the entries of earlier
epilogues in ``kernel_sm90.json`` under ``earlier_epilogues``, so the file shows before and
after."""
FUSED_EPILOGUE_SLOT_KL = FUSED_EPILOGUE.replace(
    "no KL (from the final layer's mixture, kernels/final_mixture.py)",
    "KL in the epilogue (a final-layer slot per token in every row block; kl_by_mixture False)",
)
"""The same epilogue with KL in the kernel (soft-capped or fp16 heads, or on request)."""


def _earlier_entries(path: Path) -> list[dict]:
    """The fused entries of ``path`` (a previous sweep) whose epilogue is not today's."""
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    entries = previous.get("earlier_epilogues", []) + [
        {**e, "written_at": previous.get("written_at")} for e in previous.get("entries", [])
    ]
    return [
        e
        for e in entries
        if e.get("strategy") == "triton-fused"
        and e.get("epilogue") not in (FUSED_EPILOGUE, FUSED_EPILOGUE_SLOT_KL)
    ]


def _entry(r: dict, strategy: str, kernel: str, epilogue: str | None = None) -> dict:
    """One ``kernel_sm90.json`` entry from a ``_compile_sm90`` result."""
    entry = {"strategy": strategy, "kernel": kernel}
    if epilogue is not None:
        entry["epilogue"] = epilogue
    return {
        **entry,
        "config": r["config"],
        "spill_stores": r.get("spill_stores"),
        "spill_loads": r.get("spill_loads"),
        "shared_mem_bytes": r["shared_bytes"],
        "registers": r.get("registers"),
        "sass_instructions": r.get("sass_instructions"),
        "wgmma": r.get("hgmma"),
        "ctas_per_sm": (
            ctas_per_sm(r["registers"], r["config"]["num_warps"], r["shared_bytes"])
            if r.get("registers")
            else None
        ),
        **{
            key: r[key]
            for key in (
                "sass_listing_truncated",
                "tile_loop_instructions",
                "k_loop_instructions",
                "topk_round_instructions",
                "epilogue_per_tile",
            )
            if key in r
        },
    }


def sweep(out_dir: Path) -> Path:
    """``compile_only`` of every ``SWEEP_CONFIGS`` entry, written to ``kernel_sm90.json``:
    ``{strategy, config, spill_stores, spill_loads, shared_mem_bytes, registers,
    sass_instructions}`` per entry, with the versions and the command (no GPU needed)."""
    import triton

    from codelens.workers.bench import provenance

    base = _config_type()()
    entries = []
    for bm, bn, bk, warps, stages, subtiles in SWEEP_CONFIGS:
        config = dataclasses.replace(
            base,
            block_m=bm,
            block_n=bn,
            block_k=bk,
            num_warps=warps,
            num_stages=stages,
            epilogue_subtiles=subtiles,
        )
        entries.append(
            _entry(compile_only(config), "triton-fused", "_lens_main_kernel", FUSED_EPILOGUE)
        )
        print(json.dumps(entries[-1]), flush=True)
    slot_kl = dataclasses.replace(base, kl_by_mixture=False)
    entries.append(
        _entry(compile_only(slot_kl), "triton-fused", "_lens_main_kernel", FUSED_EPILOGUE_SLOT_KL)
    )
    print(json.dumps(entries[-1]), flush=True)
    from codelens.kernels.lens_chunked import LensChunkedConfig

    for block_r, block_v, warps in FOLD_SWEEP_CONFIGS:
        config = LensChunkedConfig(fold_block_r=block_r, fold_block_v=block_v, num_warps=warps)
        kernel = "_fold_chunk_kernel (the GEMM is cuBLAS)"
        entries.append(_entry(compile_fold(config), "triton-chunked", kernel))
        print(json.dumps(entries[-1]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernel_sm90.json"
    earlier = _earlier_entries(path)
    record = {
        "target": "sm_90 (compiled offline with triton.compile; no device)",
        "triton": triton.__version__,
        **provenance("benchmarks/bench_kernel.py", sys.argv[1:]),
        "entries": entries,
        "earlier_epilogues": earlier,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _markdown(meta: dict, record: dict) -> str:
    results, checks = record["results"], record["checks"]
    lines = [
        f"# Lens kernels vs the bf16 matmul on {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- time (UTC): {meta['timestamp']}"
        + ("" if meta.get("finished") else " (not finished: the figures so far)"),
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"python {meta['python']}",
        f"- statistics: k={K}, {LOOKAHEAD} look-ahead columns, kl_final, entropy, one token set",
        f"- residual rows: {meta['rows_source']}",
        f"- fused kernel config: `{meta['config']}`",
        "",
        "| model | strategy | d | V | rows (layers x tokens) | kernel ms | kernel TFLOP/s "
        "| matmul ms | matmul TFLOP/s | kernel / matmul | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value, spec: str, missing: str = "n/a") -> str:
        return missing if value is None else format(value, spec)

    for r in results:
        shape = f"| {r['model']} | {r['strategy']} | {r['d']} | {r['V']} "
        shape += f"| {r['rows']} ({r['layers']} x {r['tokens']}) "
        if "error" in r:
            lines.append(f"{shape}| failed: {r['error']} | | | | | |")
            continue
        frac = r["fraction_of_matmul"]
        lines.append(
            f"{shape}| {r['kernel_ms']:.2f} | {r['kernel_tflops']:.0f} "
            f"| {num(r['matmul_ms'], '.2f', 'OOM')} | {num(r['matmul_tflops'], '.0f', 'OOM')} "
            f"| {'n/a' if frac is None else f'{100 * frac:.1f} %'} "
            f"| {num(r['kernel_peak_mem_gb'], '.1f')} |"
        )
    chosen = choose_defaults(results)
    for choice in chosen:
        config = f" with {choice['config']}" if choice["config"] else ""
        ms = {s: [round(t, 3) for t in times] for s, times in choice["ms"].items()}
        lines.append(f"\nDefault for d = {choice['d']}: {choice['strategy']}{config} ({ms} ms)")
    if chosen:
        lines.append(f"\n`STRATEGY_BY_WIDTH = {strategy_by_width(chosen)}`")
    for skipped in record["skipped"]:
        lines.append(f"\nNot run (time budget): {skipped}")
    for c in checks:
        verdict = "passed" if c["passed"] else "FAILED: " + "; ".join(c["failures"])
        lines += [
            "",
            f"Check of {c['strategy']} at {c.get('model', '?')}, {c.get('rows', '?')} rows: "
            f"{verdict}",
            "```",
            json.dumps(c, indent=2),
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    # Triton picks interpreter or compiler at import (and the options below import the kernels):
    # a GPU benchmark of the interpreter means nothing, and the CPU smoke run has nothing else.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    if early.parse_known_args(argv)[0].device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton
    except ImportError:
        print("bench_kernel: triton is not installed (pip install 'code-llm-lens[triton]')")
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: all four")
    parser.add_argument(
        "--rows",
        nargs="+",
        type=int,
        help=f"target rows (layers x tokens) per shape (default {list(DEFAULT_ROWS)})",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: the smoke run (tiny shape, kernels in Triton's interpreter, figures into a "
        "temporary folder unless --out-dir)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with lens_stats_torch at a production shape before timing",
    )
    parser.add_argument(
        "--check-tokens",
        type=int,
        default=None,
        help="tokens of the --check shape (all layers of Qwen2.5-Coder-7B; default 96)",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile for sm_90 and report shared memory / spills (no GPU needed)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="with --compile-only: every SWEEP_CONFIGS entry, written to kernel_sm90.json",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=[*MAIN_STRATEGIES, *FUSED_VARIANTS, *CHUNKED_VARIANTS],
        default=["triton-fused"],
        help="the lens strategies to check and time",
    )
    parser.add_argument(
        "--source",
        choices=sorted(PROBLEMS),
        default="synthetic",
        help="residual rows: synthetic normals, or a random-weight model's real forward",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting checks and timings after this many seconds (what is left is listed "
        "as not run); the figures so far are written after every one",
    )
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results")
    for field in dataclasses.fields(_config_type()):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()

    config_type = _config_type()
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_type)
        if getattr(args, f.name) is not None
    }
    config = dataclasses.replace(config_type(), **overrides)

    if args.compile_only and args.sweep:
        print(f"wrote {sweep(args.out_dir or RESULTS)}")
        return 0
    if args.compile_only:
        print(json.dumps(compile_only(config), indent=2))
        return 0
    smoke = args.device == "cpu"
    if smoke:
        import tempfile

        from codelens.kernels.lens_triton import default_config

        models, rows_targets = args.models or ["tiny"], args.rows or [96]
        config = dataclasses.replace(default_config(MODELS[models[0]][1], True), **overrides)
        check_model, check_tokens = "tiny", args.check_tokens or 16
        timer, timing = wall_clock_timer, {}
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench_kernel-"))
        device_name = "cpu (Triton interpreter)"
    elif not torch.cuda.is_available():
        print("bench_kernel: no CUDA device; nothing to time (try --compile-only, or --device cpu)")
        return 0
    else:
        from triton.testing import do_bench

        models, rows_targets = args.models or list(GPU_MODELS), args.rows or list(DEFAULT_ROWS)
        check_model, check_tokens = "qwen7b", args.check_tokens or 96
        timer, timing = do_bench, {"warmup": args.warmup, "rep": args.rep}
        out_dir = args.out_dir or RESULTS
        device_name = torch.cuda.get_device_name()

    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "timestamp": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": dataclasses.asdict(config),
        "strategies": args.strategies,
        "rows_source": args.source,
        "finished": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    stem = out_dir / f"kernel-{slug}-{meta['timestamp'].replace(':', '')}"

    def write(record: dict) -> None:
        meta["defaults"] = choose_defaults(record["results"])
        meta["strategy_by_width"] = strategy_by_width(meta["defaults"])
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **record}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(_markdown(meta, record))

    deadline = started + args.budget_s if args.budget_s is not None else float("inf")
    record = run_all(
        models,
        rows_targets,
        args.strategies,
        config,
        args.device,
        args.source,
        timer,
        timing,
        check_model if args.check else None,
        check_tokens,
        deadline,
        write,
    )
    meta["finished"] = True
    write(record)
    print(f"wrote {stem}.json and {stem}.md")
    failed = [c["strategy"] for c in record["checks"] if not c["passed"]]
    failed += [r["strategy"] for r in record["results"] if "error" in r]
    if failed:
        print(f"bench_kernel: failed: {sorted(set(failed))} (see {stem}.md)")
    return 1 if failed else 0


def _config_type():
    """``LensTritonConfig`` (imported lazily: importing Triton is only needed past the CLI)."""
    from codelens.kernels.lens_triton import LensTritonConfig

    return LensTritonConfig


if __name__ == "__main__":
    raise SystemExit(main())
