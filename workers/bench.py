"""What the lens costs: the methods ``codelens bench`` and ``benchmarks/bench_lens.py`` time.

Every method reads the same model and the same tokens and computes, for all layers 0..L, the same
statistics (top-k with k = 10, target log-prob and rank, entropy, KL to the final layer, look-ahead
ranks). Each reports the forward seconds, the lens seconds, the lens stage's working memory (peak
growth of resident memory on a CPU, of allocated memory on a GPU) and the top-1 ids and target
log-probs it found, so runs can be checked against each other.

Methods:

* ``codelens``: our engine (hooks into a preallocated buffer, ``kernels.lens_stats`` with impl
  auto: the vocab-chunked torch path on a CPU, the fused Triton kernel on a GPU).
* ``naive``: the common recipe: ``output_hidden_states``, then per layer the final norm, full
  ``[T, V]`` logits, ``log_softmax``, top-k, rank, entropy and KL in torch.
* ``matmul``: the bound: the bare ``[rows, d] x [d, V]`` products alone, rows = (L + 1) * T.
* ``transformer_lens`` / ``tuned_lens``: in ``benchmarks/bench_lens.py`` (optional packages).
"""

from __future__ import annotations

import os
import platform
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

K = 10
LOOKAHEAD = (2, 3)


@dataclass
class MethodResult:
    """One method's figures.

    Attributes:
        method: method name.
        tokens: tokens processed (each read at L + 1 layers).
        forward_s: seconds in the model's forward pass (0 for ``matmul``).
        lens_s: seconds in the lens stage.
        peak_mem_bytes: working memory of the lens stage (peak growth over its start).
        top1: ``[L + 1, T]`` top-1 ids (not serialised to JSON).
        target_logprob: ``[L + 1, T]`` (not serialised to JSON).
    """

    method: str
    tokens: int
    forward_s: float
    lens_s: float
    peak_mem_bytes: int
    top1: np.ndarray | None = field(default=None, repr=False)
    target_logprob: np.ndarray | None = field(default=None, repr=False)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second through forward + lens."""
        return self.tokens / (self.forward_s + self.lens_s)

    def to_json(self) -> dict[str, Any]:
        """The figures (arrays dropped)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("top1", "target_logprob")}
        out["tokens_per_s"] = round(self.tokens_per_s, 2)
        out["lens_over_forward"] = (
            round(self.lens_s / self.forward_s, 3) if self.forward_s else None
        )
        return out


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file (None when absent)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def provenance(script: str, argv: list[str]) -> dict[str, Any]:
    """What a recorded benchmark figure carries: machine, package versions, the command that made
    it (``python SCRIPT ARGS``) and when."""
    from codelens.workers.job import package_versions  # imported on use, as the engine below

    return {
        "machine": machine_info(),
        "versions": package_versions(),
        "command": "python " + shlex.join([script, *argv]),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def provenance_markdown(r: dict[str, Any]) -> list[str]:
    """``provenance``'s fields as the closing lines of a results page."""
    m = r["machine"]
    return [
        f"Machine: {m['cpu']}, {m['cpus']} cores, {m['platform']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + ".",
        f"Command: `{r['command']}` ({r['written_at']}).",
    ]


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model and count, memory, GPU, OS, Python, host."""
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "memory_gib": None if mem_kib is None else round(int(mem_kib.split()[0]) / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device):
    """Measure the peak growth of memory inside the block: ``with peak_memory(dev) as peak: ...``.

    On CUDA: ``max_memory_allocated`` growth. On a CPU: resident set size sampled every 0.5 ms by
    a thread (a peak shorter than that can be missed; the lens stages last seconds).
    """
    result: dict[str, int] = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["bytes"] = max(0, max(peak[0], _rss_bytes()) - base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def targets_of(ids: Tensor) -> Tensor:
    """``[T, 1 + A]`` next-token and look-ahead targets of a 1-D id sequence (-1 past the end)."""
    from codelens.engine.run.pipeline import TextInput

    return torch.from_numpy(TextInput.of(ids.tolist(), LOOKAHEAD, bos_id=None).targets).long()


def run_codelens(loaded, ids: Tensor, impl: str = "auto") -> MethodResult:
    """Our engine on one sequence ``ids [T]``: the lens pipeline, capture and lens timed apart."""
    from codelens.engine.run.pipeline import LensPipeline, TextInput
    from codelens.engine.run.request import resolve_lens
    from codelens.engine.schemas import LensSpec

    device = loaded.device
    spec = LensSpec(layers="all", k=K, lookahead=list(LOOKAHEAD), impl=impl)
    pipeline = LensPipeline(loaded, resolve_lens(spec, loaded))
    text = TextInput.of(ids.tolist(), LOOKAHEAD, bos_id=None)
    _sync(device)
    start = time.perf_counter()
    hidden, _ = pipeline.capture([text])
    _sync(device)
    forward_s = time.perf_counter() - start
    with peak_memory(device) as peak:
        start = time.perf_counter()
        stats = pipeline.statistics(hidden, targets_of(ids))
        _sync(device)
        lens_s = time.perf_counter() - start
    return MethodResult(
        "codelens",
        ids.numel(),
        forward_s,
        lens_s,
        peak["bytes"],
        stats.topk_ids[..., 0].cpu().numpy(),
        stats.target_logprob.cpu().numpy(),
    )


def naive_statistics(
    per_layer_logits: Iterable[Tensor], targets: Tensor, final_logits: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """The common recipe's statistics, one full ``[T, V]`` log-softmax per layer.

    Computes top-k, target and look-ahead ranks, entropy and KL to the final layer like every
    method (only the top-1 ids and target log-probs are kept, for the agreement check).

    Args:
        per_layer_logits: ``[T, V]`` lens logits of each layer 0..L.
        targets: ``[T, 1 + A]`` from ``targets_of``.
        final_logits: ``[T, V]`` the model's own logits.

    Returns:
        ``[L + 1, T]`` top-1 ids and target log-probs (NaN without a target).
    """
    final_logp = torch.log_softmax(final_logits.float(), -1)
    final_p = final_logp.exp()
    top1, target_lp = [], []
    for logits in per_layer_logits:
        logp = torch.log_softmax(logits.float(), -1)
        _, top_ids = logp.topk(K, -1)
        lp_t = logp.gather(-1, targets.clamp_min(0))
        _ranks = (logp[:, None, :] > lp_t[:, :, None]).sum(-1)
        _entropy = -(logp.exp() * logp).sum(-1)
        _kl = (final_p * (final_logp - logp)).sum(-1)
        top1.append(top_ids[:, 0])
        target_lp.append(torch.where(targets[:, 0] >= 0, lp_t[:, 0], torch.nan))
    return torch.stack(top1).cpu().numpy(), torch.stack(target_lp).float().cpu().numpy()


def run_naive(loaded, ids: Tensor) -> MethodResult:
    """The common recipe: ``output_hidden_states`` and full logits per layer."""
    model, parts = loaded.model, loaded.parts
    device = loaded.device
    head = parts.head
    n_blocks = len(parts.blocks)
    inp = ids[None].to(device)
    tgt = targets_of(ids).to(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=inp, output_hidden_states=True, use_cache=False)
        _sync(device)
        forward_s = time.perf_counter() - start
        with peak_memory(device) as peak:
            start = time.perf_counter()
            # hidden_states[-1] is already normalised in HF: the final layer is the model's logits.
            per_layer = (
                head.logits(out.hidden_states[layer][0]) if layer < n_blocks else out.logits[0]
                for layer in range(n_blocks + 1)
            )
            top1, target_lp = naive_statistics(per_layer, tgt, out.logits[0])
            _sync(device)
            lens_s = time.perf_counter() - start
    return MethodResult(
        "naive",
        ids.numel(),
        forward_s,
        lens_s,
        peak["bytes"],
        top1,
        target_lp,
    )


def run_matmul(loaded, ids: Tensor, vocab_chunk: int = 8192) -> MethodResult:
    """The bound: ``[rows, d] x [d, V]`` with rows = (L + 1) * T, in the model's dtype."""
    parts, device = loaded.parts, loaded.device
    rows = (len(parts.blocks) + 1) * ids.numel()
    w = parts.head.unembed
    dtype = loaded.dtype if device.type == "cuda" else torch.float32
    x = torch.randn(rows, w.shape[1], device=device, dtype=dtype)
    w = w.to(dtype)
    with torch.inference_mode(), peak_memory(device) as peak:
        _sync(device)
        start = time.perf_counter()
        for v0 in range(0, w.shape[0], vocab_chunk):
            x @ w[v0 : v0 + vocab_chunk].T
        _sync(device)
        lens_s = time.perf_counter() - start
    return MethodResult("matmul", ids.numel(), 0.0, lens_s, peak["bytes"])


METHODS: dict[str, Callable[..., MethodResult]] = {
    "codelens": run_codelens,
    "naive": run_naive,
    "matmul": run_matmul,
}


def bench_tokens(vocab_size: int, n_tokens: int, seed: int = 0) -> Tensor:
    """Deterministic token ids for a benchmark sequence."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_tokens,), generator=gen)
