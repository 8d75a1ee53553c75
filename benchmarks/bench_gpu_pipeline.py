"""End-to-end tokens/s and device busy time of ``codelens run``, random-weight Qwen2.5-Coder shapes.

What a user gets on one GPU: for each shape, a model with the real architecture and random bf16
weights is built on the device, saved with ``save_pretrained`` (safetensors, 5 GB shards, plus
the bundled model's tokenizer) into a temporary directory, and then run through the real path,
``run_job`` -> ``LocalExecutor`` -> ``LensWorker.load`` -> ``load_model`` (with its self-check),
over real source files (the running interpreter's standard library), with a production-like job:
window 1024 (overlap 128), k 10, look-ahead [2, 3], two token sets, ``lens.impl: auto`` (the
Triton kernel on a GPU; ``--impl``), every layer. The model's vocabulary (151,936 / 152,064
rows) is far larger than the tokenizer's 4,096 tokens: the lens treats the rows beyond the
tokenizer as padded rows of the softmax, as it does for Qwen2.5-Coder's own 151,665-token
tokenizer, so the cost per row is the real model's.

Measured per shape (each shape in a fresh process, so device memory, peak RSS and the Triton
compile are its own):

* **end to end**: tokens/s of the run phase of ``run_job`` (first shard planned to last commit;
  the model load and the counting pass excluded), and the same in steady state (first commit to
  last: the first shard's planning and Triton's first compile excluded);
* **compute only**: ``LensWorker.compute`` over the same shards with the same loaded model,
  device synchronised, no host stage (forward, capture, lens, copies to the host);
* **device busy**: the GPU's utilisation (NVML's ``utilization.gpu``: the share of each sample
  period in which a kernel was running; pynvml, else ``nvidia-smi -lms``) sampled every
  ``--sample-ms`` and averaged over the run phase, and over the compute-only pass for reference;
  on a CPU it is not measured (null). Beside it, compute-only seconds / end-to-end seconds for the
  same tokens, which needs no NVML;
* peak device memory (``max_memory_allocated`` and ``_reserved`` over the run phase; NVML's
  ``memory.used``), the model's build, save and load seconds, the process's peak RSS (whole life:
  build, save and load included) and the RSS peak sampled during the run phase; the useful
  TFLOP/s (forward ``2 * non-embedding params`` per input token, lens ``2 * (L + 1) * d * V`` per
  emitted token) against the ~790 TFLOP/s bf16 matmul rate of an H200.

Shapes (``transformers.Qwen2Config``, as in the checkpoints' ``config.json``; 28 blocks -> 29
lens rows per token):

=====================  ======  ============  ======  =====  ========  =======  =====  ===========
shape                  hidden  intermediate  layers  heads  kv heads  vocab    tied   weights
=====================  ======  ============  ======  =====  ========  =======  =====  ===========
qwen2.5-coder-1.5b     1536    8960          28      12     2         151936   yes    3.1 GB bf16
qwen2.5-coder-7b       3584    18944         28      28     4         152064   no     15.2 GB bf16
tiny (CPU smoke run)   64      256           2       4      2         4160     yes    1 MB
=====================  ======  ============  ======  =====  ========  =======  =====  ===========

(rope_theta 1e6, rms_norm_eps 1e-6, q/k/v biases, as Qwen2 has.)

The saved models go to /dev/shm when it has room for the largest shape twice over (else
``--tmp-dir``; ``--model-tmp`` chooses), so that disk speed does not decide whether a 15 GB model
fits the budget; the load seconds are then those of a model in the page cache (a user's second
run). The corpus and the run directory (Parquet parts, fsync) are on ``--tmp-dir``, a disk.

Writes ``gpu_pipeline.json`` and ``gpu_pipeline.md`` into ``--out`` after every shape, so a run
stopped by its time limit keeps the shapes it finished. On a CPU ``--out`` defaults to a fresh
temporary directory, so a smoke run never replaces the recorded GPU figures in
``benchmarks/results/``.

Usage::

    python benchmarks/bench_gpu_pipeline.py                      # GPU: both shapes, --budget-s 420
    python benchmarks/bench_gpu_pipeline.py --shape qwen2.5-coder-7b --tokens 524288
    python benchmarks/bench_gpu_pipeline.py --device cpu         # CPU smoke run: tiny shape, ~30 s

Time budget (``--budget-s``, default 420 s for the whole command). Estimates for an H200, from
the FLOP counts and the figures in ``benchmarks/results/``, not yet readings:

=====================================  =============  ============
step                                   1.5B           7B
=====================================  =============  ============
process start, imports, CUDA context   10-15 s        10-15 s
build on the GPU (random init, bf16)   2-5 s          5-10 s
save_pretrained (GPU -> host -> shm)   5-15 s         25-60 s
corpus (select files, copy)            1-2 s          1-2 s
counting pass + load_model + check     5-15 s         20-45 s
end to end, 262,144 tokens             10-20 s        20-35 s
compute only, the same tokens          10-15 s        20-30 s
=====================================  =============  ============

About 60-90 s for the 1.5B and 100-200 s for the 7B, i.e. 160-290 s together. The budget is
enforced without losing figures: each shape gets a share of what is left (by its estimate), and
inside a shape, once the model is loaded, the end-to-end run stops taking new shards at half of
the shape's remaining time (the shards already planned still finish: about 3 shards of overshoot)
and the compute-only pass stops at the shape's deadline; both report the tokens they did (and
``truncated``). A shape whose fixed cost no longer fits is skipped, and said so. A shape that
outruns its deadline by more than 45 s is killed, recorded as failed, and the next one runs.

On the device machine (Python 3.12, torch 2.11, triton 3.6, transformers 5.17, pyarrow; no
pydantic), carry pydantic and what it needs as wheels. Once, here, in the repository root (the
versions are those of ``constraints.txt``; ``/.whl/`` is in ``.gitignore``)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0

(2.8 MB; typing_extensions because pydantic 2.14 needs >= 4.16.) Everything else the package
imports is on that machine already (typer, rich, pygments, pyyaml, numpy, safetensors, tokenizers,
matplotlib; nvidia-ml-py gives pynvml). The package is not installed there: ``gpu_check.sh``
maps ``codelens.engine`` / ``.kernels`` / ``.workers`` onto the copied working tree with three
links (``codelens`` is a namespace package) and installs ``.whl/`` beside them, so it runs the
code as it is in the tree. Triton needs nothing special (no ``TRITON_INTERPRET`` there: the
kernel compiles for sm_90). This benchmark is the third stage of that one command (one device
call, ``carry: [".whl"]``, ``timeout_s: 590``: README, "The one GPU check"); alone, in such a
call: ``bash benchmarks/gpu_check.sh --stages pipeline --budget-s 420``. Copy
``gpu_pipeline.json`` and ``.md`` from the fetched files into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from codelens.engine.schemas import validate_spec
from codelens.engine.zoo.code_sources import all_files, stdlib_root
from codelens.engine.zoo.default_model import default_model_dir
from codelens.workers.bench import machine_info
from codelens.workers.job import package_versions, run_job
from codelens.workers.local import LocalExecutor
from codelens.workers.worker import LensWorker

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    """A Qwen2 architecture (``transformers.Qwen2Config`` fields) and its time estimates."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    fixed_s: float
    """Estimated seconds before the first shard: process start, build, save, load."""
    tokens_per_s: float
    """Estimated end-to-end tokens/s (for splitting the budget between shapes)."""


SHAPES: dict[str, Shape] = {
    "qwen2.5-coder-1.5b": Shape(1536, 8960, 28, 12, 2, 151_936, True, 50.0, 20_000.0),
    "qwen2.5-coder-7b": Shape(3584, 18944, 28, 28, 4, 152_064, False, 130.0, 10_000.0),
    "tiny": Shape(64, 256, 2, 4, 2, 4160, True, 10.0, 3_000.0),
}

TOKEN_SETS = {"py": ["def", "self", "elif"], "js": ["function", "const", "=>"]}
"""Two token sets, as in the README's example job."""

GRACE_S = 45.0
"""A shape's process is killed this long after its deadline (its fixed costs cannot be cut)."""

H200_BF16_TFLOPS = 790.0
"""bf16 matmul rate measured on an H200 of this workplace (8192^3, random data)."""


def qwen2_config(shape: Shape, tokenizer_dir: Path) -> Any:
    """The ``Qwen2Config`` of ``shape``, with the special-token ids of the bundled tokenizer."""
    import transformers

    tok = json.loads((tokenizer_dir / "config.json").read_text())
    return transformers.Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=shape.tied,
        use_sliding_window=False,
        bos_token_id=tok["bos_token_id"],
        eos_token_id=tok["eos_token_id"],
        pad_token_id=tok["pad_token_id"],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model_dir(shape: Shape, out: Path, device: torch.device) -> dict[str, Any]:
    """Random bf16 weights built on ``device`` (no fp32 copy), saved with the bundled tokenizer."""
    import transformers

    tokenizer_dir = default_model_dir()
    config = qwen2_config(shape, tokenizer_dir)
    torch.manual_seed(0)
    start = time.perf_counter()
    # from_config(dtype=...) makes bf16 the default dtype while the modules are created, and the
    # device context creates them on the device: HF's init then runs there, in bf16.
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    built_on = str(next(model.parameters()).device)
    if next(model.parameters()).device.type != device.type:
        model.to(device)
    model.eval()
    _sync(device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = model.get_input_embeddings().weight.numel()
    head = 0 if shape.tied else model.get_output_embeddings().weight.numel()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})

    start = time.perf_counter()
    out.mkdir(parents=True)
    model.save_pretrained(out, max_shard_size="5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    save_s = time.perf_counter() - start
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "build_s": round(build_s, 2),
        "save_s": round(save_s, 2),
        "built_on": built_on,
        "weight_dtypes": dtypes,
        "params": params,
        "non_embedding_params": params - embed - head,
        "weight_bytes": weight_bytes,
        "files": sorted(p.name for p in out.glob("*.safetensors")),
    }


def make_corpus(tokenizer: Any, n_tokens: int, out: Path, seed: int = 0) -> dict[str, Any]:
    """Copy standard-library files (shuffled, fixed seed) until they hold ``n_tokens`` tokens.

    A file that would take the total more than 5% past ``n_tokens`` is passed over for a smaller
    one, so the corpus holds ``n_tokens`` to ``1.05 * n_tokens`` tokens.
    """
    root = stdlib_root()
    rels = [f.key for f in all_files("python")]
    random.Random(seed).shuffle(rels)
    out.mkdir(parents=True)
    total = n_bytes = 0
    chosen = 0
    for rel in rels:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if total + n > 1.05 * n_tokens:
            continue
        total += n
        n_bytes += len(text.encode("utf-8"))
        shutil.copyfile(root / rel, out / f"{chosen:05d}_{rel.replace('/', '__')}")
        chosen += 1
        if total >= n_tokens:
            break
    return {"files": chosen, "tokens": total, "bytes": n_bytes, "source": str(root)}


def weight_bytes(shape: Shape) -> int:
    """bf16 bytes of a Qwen2 model of ``shape`` (q/k/v biases and norms included)."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    attn = shape.hidden * (shape.hidden + 2 * kv) + (shape.hidden + 2 * kv) + shape.hidden**2
    block = attn + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden
    embed = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return 2 * (shape.layers * block + embed + shape.hidden)


def model_dir_root(args: argparse.Namespace) -> str | None:
    """``--model-tmp``, else /dev/shm when it has room for the largest shape twice, else
    ``--tmp-dir``: a 15 GB save and load then run at memory speed, whatever the disk does (the
    load seconds are then those of a model in the page cache, the common case after a first
    run); the corpus and the run directory stay on ``--tmp-dir``."""
    if args.model_tmp:
        return args.model_tmp
    largest = max(weight_bytes(SHAPES[s]) for s in args.shape)
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 2 * largest + (1 << 30):
            return str(shm)
    except OSError:
        pass
    return args.tmp_dir


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _nvml_index() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed shape leaves no sampler running; libc is loaded here,
    before the fork."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Sampler:
    """Samples GPU utilisation, GPU memory used and this process's RSS every ``period_s``.

    GPU figures come from pynvml when it imports, else from ``nvidia-smi -lms`` (its own
    timestamps, so pipe buffering does not matter), else they are None (no GPU, or no NVML).
    """

    def __init__(self, period_s: float, gpu: bool) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, float | None, float | None]] = []  # (epoch, util, MiB)
        self.rss: list[tuple[float, int]] = []
        self.source: str | None = None
        self.why_not: str | None = None if gpu else "no CUDA device"
        self.gpu_name: str | None = None
        self.driver: str | None = None
        self._stop = threading.Event()
        self._nvml: Any = None
        self._handle: Any = None
        self._smi: subprocess.Popen | None = None
        self._smi_file: Path | None = None
        if gpu:
            self._open_gpu()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-sampler")

    def _open_gpu(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
            self._nvml = pynvml
            self.source = "pynvml nvmlDeviceGetUtilizationRates"
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.gpu_name = name.decode() if isinstance(name, bytes) else name
            driver = pynvml.nvmlSystemGetDriverVersion()
            self.driver = driver.decode() if isinstance(driver, bytes) else driver
            return
        except Exception as e:  # noqa: BLE001 - fall back to nvidia-smi
            reason = f"pynvml: {type(e).__name__}: {e}"
        if shutil.which("nvidia-smi") is None:
            self.why_not = f"{reason}; no nvidia-smi"
            return
        fd, name = tempfile.mkstemp(prefix="bench-smi-", suffix=".csv")
        os.close(fd)
        self._smi_file = Path(name)
        query = "--query-gpu=timestamp,utilization.gpu,memory.used"
        period_ms = str(max(1, int(self.period_s * 1000)))
        cmd = ["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", period_ms]
        cmd += ["-i", str(_nvml_index()), "-f", str(self._smi_file)]
        self._smi = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent()
        )
        self.source = "nvidia-smi --query-gpu=utilization.gpu -lms"

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            self.rss.append((now, _rss_bytes()))
            if self._nvml is not None:
                try:
                    util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                    used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
                    self.samples.append((now, float(util), float(used)))
                except Exception:  # noqa: BLE001 - a missed sample
                    pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._smi is not None:
            self._smi.terminate()
            try:
                self._smi.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._smi.kill()
            self._read_smi()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def _read_smi(self) -> None:
        assert self._smi_file is not None
        for line in self._smi_file.read_text(errors="replace").splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((stamp, float(parts[1]), float(parts[2])))
            except (ValueError, IndexError):
                continue
        self._smi_file.unlink(missing_ok=True)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Figures over the epoch interval ``[start, end]``."""
        rss = [r for t, r in self.rss if start <= t <= end]
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        out: dict[str, Any] = {
            "host_rss_peak_gib": round(max(rss) / 2**30, 2) if rss else None,
            "gpu_util_samples": len(inside),
        }
        if not inside:
            out.update(gpu_busy_mean_pct=None, gpu_busy_median_pct=None, gpu_mem_used_max_gib=None)
            return out
        utils = sorted(u for u, _ in inside)
        out.update(
            gpu_busy_mean_pct=round(sum(utils) / len(utils), 1),
            gpu_busy_median_pct=utils[len(utils) // 2],
            gpu_busy_below_50pct_share=round(sum(u < 50 for u in utils) / len(utils), 3),
            gpu_mem_used_max_gib=round(max(m for _, m in inside) / 1024, 2),
        )
        return out


class TimedWorker(LensWorker):
    """``LensWorker`` with the seconds of each ``compute`` call recorded (the device stage of the
    end-to-end run, as it ran beside the planner and host threads)."""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.compute_s: list[float] = []

    def compute(self, task: Any) -> Any:
        computed = super().compute(task)
        self.compute_s.append(computed.seconds)
        return computed


class TimedExecutor(LocalExecutor):
    """The local executor as shipped, with timestamps around its phases.

    ``start`` times the model load; ``run`` times the run phase and each commit, and stops taking
    new shards after ``stop_at`` (epoch seconds, set from the budget once the model is loaded);
    ``shutdown`` is deferred to ``release`` so that the compute-only pass reuses the model.
    """

    def __init__(self, spec: Any, deadline: float, device: torch.device) -> None:
        super().__init__(spec, worker_cls=TimedWorker)
        self.deadline = deadline
        self.device = device
        self.load_s: float | None = None
        self.stop_at: float | None = None
        self.run_start = self.run_end = 0.0
        self.commits: list[tuple[float, int, int]] = []  # (epoch, tokens, rows)
        self.shards: list[Any] = []
        self.truncated = False
        self.peak_allocated = self.peak_reserved = 0

    def start(self) -> dict[str, Any]:
        start = time.perf_counter()
        resolved = super().start()
        _sync(self.device)
        self.load_s = time.perf_counter() - start
        now = time.time()
        self.stop_at = now + 0.5 * max(0.0, self.deadline - now)
        print(f"  loaded in {self.load_s:.1f} s: {resolved}", flush=True)
        return resolved

    def run(self, shards, commit, tracker) -> None:
        def limited():
            for shard in shards:
                if self.stop_at is not None and time.time() > self.stop_at:
                    self.truncated = True
                    return
                self.shards.append(shard)
                yield shard

        def timed_commit(result) -> None:
            commit(result)
            self.commits.append((time.time(), result.n_tokens, result.rows))

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.run_start = time.time()
        try:
            super().run(limited(), timed_commit, tracker)
        finally:
            _sync(self.device)
            self.run_end = time.time()
            if self.device.type == "cuda":
                self.peak_allocated = torch.cuda.max_memory_allocated(self.device)
                self.peak_reserved = torch.cuda.max_memory_reserved(self.device)

    def shutdown(self) -> None:
        """Deferred: ``release`` frees the model after the compute-only pass."""

    def release(self) -> None:
        super().shutdown()


def flops_per_token(shape: Shape, non_embedding: int, input_tokens: int, emitted: int) -> float:
    """Useful FLOPs per emitted token: forward matmuls over every input token, plus the lens
    matmul of every captured layer (attention scores left out: ~5% at window 1024 and d 1536)."""
    forward = 2.0 * non_embedding * input_tokens / max(emitted, 1)
    lens = 2.0 * (shape.layers + 1) * shape.hidden * shape.vocab
    return forward + lens


def run_shape(name: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """One shape, in this process: build, save, corpus, run_job, compute-only pass."""
    shape = SHAPES[name]
    device = torch.device(args.device)
    t_process = time.time()
    tmp, model_root = Path(args.work_dir), Path(args.model_root)  # made (and removed) by main
    model_dir = model_root / "model"
    result: dict[str, Any] = {"shape": name, "model_dir": str(model_dir), "tmp_dir": str(tmp)}
    try:
        print(f"[{name}] building on {device}, saving to {model_dir} ...", flush=True)
        result["model"] = build_model_dir(shape, model_dir, device)
        m = result["model"]
        print(
            f"[{name}] built in {m['build_s']} s ({m['params'] / 1e9:.2f}B params, "
            f"{m['weight_bytes'] / 1e9:.1f} GB, on {m['built_on']}), saved in {m['save_s']} s",
            flush=True,
        )
        from transformers import AutoTokenizer

        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        result["corpus"] = make_corpus(tokenizer, args.tokens, tmp / "corpus")
        result["corpus"]["prepare_s"] = round(time.perf_counter() - start, 2)
        spec = validate_spec(
            {
                "name": f"bench-gpu-{name}",
                "model": {"path": str(model_dir), "device": device.type, "dtype": "auto"},
                "corpus": {"kind": "files", "paths": [str(tmp / "corpus" / "*.py")]},
                "tokens": {"window": args.window, "overlap": args.overlap},
                "lens": {
                    "k": 10,
                    "lookahead": [2, 3],
                    "token_sets": TOKEN_SETS,
                    "impl": args.impl,
                },
                "output": {"dir": str(tmp / "run"), "shard_tokens": args.shard_tokens},
                "execution": {"backend": "local", "batch_tokens": args.batch_tokens},
            }
        )
        # Stop the compute-only pass early enough to write the figures and delete the model.
        executor = TimedExecutor(spec, deadline - 8.0, device)
        with Sampler(args.sample_ms / 1000, device.type == "cuda") as sampler:
            start = time.perf_counter()
            outcome = run_job(spec, show_progress=False, executor=executor)
            job_s = time.perf_counter() - start
            compute = compute_pass(executor, device, deadline - 8.0)
        executor.release()
        result["resolved"] = outcome.resolved
        result["timings_s"] = {
            "load": round(executor.load_s or 0.0, 2),
            "run_job_wall": round(job_s, 2),
            "run_job_outside_load_and_run": round(
                job_s - (executor.load_s or 0.0) - (executor.run_end - executor.run_start), 2
            ),
        }
        result["end_to_end"] = end_to_end_figures(executor, sampler, spec)
        result["compute_only"] = {
            k: v for k, v in compute.items() if k not in ("start", "end")
        } | sampler.window(compute["start"], compute["end"])
        result["gpu_sampling"] = {
            "source": sampler.source,
            "not_measured_because": sampler.why_not if not sampler.samples else None,
            "period_ms": args.sample_ms,
            "nvml_gpu_name": sampler.gpu_name,
            "driver": sampler.driver,
        }
        e2e, comp = result["end_to_end"], result["compute_only"]
        if e2e["tokens"] and comp["tokens"]:
            per_token_e2e = e2e["seconds"] / e2e["tokens"]
            per_token_compute = comp["seconds"] / comp["tokens"]
            result["compute_over_end_to_end"] = round(per_token_compute / per_token_e2e, 3)
            useful = flops_per_token(
                shape, m["non_embedding_params"], comp["input_tokens"], comp["tokens"]
            )
            result["useful_gflop_per_token"] = _sig(useful / 1e9)
            result["useful_tflops"] = {
                "end_to_end": _sig(useful * e2e["tokens_per_s"] / 1e12),
                "compute_only": _sig(useful * comp["tokens_per_s"] / 1e12),
            }
        result["host_peak_rss_gib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2
        )
        if device.type == "cuda":
            result["gpu_total_gib"] = round(
                torch.cuda.get_device_properties(device).total_memory / 2**30, 1
            )
        result["state"] = "done"
    finally:
        for folder in (model_dir, tmp / "corpus", tmp / "run"):  # main removes the rest
            shutil.rmtree(folder, ignore_errors=True)
        result["process_wall_s"] = round(time.time() - t_process, 1)
    return result


def _sig(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` significant digits."""
    return float(f"{x:.{digits}g}")


def end_to_end_figures(executor: TimedExecutor, sampler: Sampler, spec: Any) -> dict[str, Any]:
    """Run-phase figures: all commits, and the steady state from the first commit to the last."""
    commits = executor.commits
    tokens = sum(n for _, n, _ in commits)
    seconds = executor.run_end - executor.run_start
    out: dict[str, Any] = {
        "tokens": tokens,
        "rows": sum(r for _, _, r in commits),
        "shards": len(commits),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "first_commit_s": round(commits[0][0] - executor.run_start, 3) if commits else None,
        "truncated": executor.truncated,
        # The device stage inside this run (LensWorker.compute beside the planner and host
        # threads), against the compute-only pass: how much the other stages slow it down.
        "compute_stage_s": round(sum(executor.worker.compute_s[: len(commits)]), 3),
        "shard_tokens": spec.output.shard_tokens,
        "batch_tokens": spec.execution.batch_tokens,
    }
    if len(commits) >= 2:
        steady_s = commits[-1][0] - commits[0][0]
        steady_tokens = sum(n for _, n, _ in commits[1:])
        out["steady_tokens_per_s"] = round(steady_tokens / steady_s, 1) if steady_s > 0 else None
    else:
        out["steady_tokens_per_s"] = None
    if executor.device.type == "cuda":
        out["gpu_peak_allocated_gib"] = round(executor.peak_allocated / 2**30, 2)
        out["gpu_peak_reserved_gib"] = round(executor.peak_reserved / 2**30, 2)
    return out | sampler.window(executor.run_start, executor.run_end)


def compute_pass(executor: TimedExecutor, device: torch.device, deadline: float) -> dict[str, Any]:
    """``LensWorker.compute`` alone over the shards the run committed (device synchronised).

    Since the statistics are put in window order on the host thread (``ShardStats.assembled``,
    2026-12-08), this stage no longer includes that copy: its figures are not comparable with
    runs recorded before."""
    worker = executor.worker
    shards = executor.shards[: len(executor.commits)]
    per_shard: list[float] = []
    tokens = input_tokens = 0
    truncated = False
    _sync(device)
    start = time.time()
    for shard in shards:
        if time.time() > deadline:
            truncated = True
            break
        t0 = time.perf_counter()
        worker.compute(shard)
        _sync(device)
        per_shard.append(time.perf_counter() - t0)
        tokens += shard.n_tokens
        input_tokens += sum(len(w.input_ids) for w in shard.windows)
    end = time.time()
    seconds = sum(per_shard)
    return {
        "tokens": tokens,
        "input_tokens": input_tokens,
        "shards": len(per_shard),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "shard_s_median": round(sorted(per_shard)[len(per_shard) // 2], 3) if per_shard else None,
        "truncated": truncated,
        "start": start,
        "end": end,
    }


def source_digest() -> str:
    """sha256 (12 hex) of the package's Python sources: which tree the figures came from."""
    digest = hashlib.sha256()
    for folder in ("engine", "kernels", "workers"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def child_main(args: argparse.Namespace) -> None:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        result = run_shape(args.child, args, args.deadline)
    except BaseException as e:  # recorded for the parent, then re-raised
        result = {"shape": args.child, "state": "failed", "error": f"{type(e).__name__}: {e}"}
        Path(args.child_result).write_text(json.dumps(result, indent=2) + "\n")
        raise
    Path(args.child_result).write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help="repeat for several (default: both Qwen shapes on a GPU, tiny on a CPU)",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--tokens", type=int, help="corpus tokens per shape (GPU 262144, CPU 16384)"
    )
    parser.add_argument(
        "--impl",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="lens.impl (auto: the Triton kernel on a GPU)",
    )
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument(
        "--batch-tokens", type=int, help="execution.batch_tokens (GPU 16384, CPU 4096)"
    )
    parser.add_argument(
        "--shard-tokens", type=int, help="output.shard_tokens (GPU 32768, CPU 4096)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="wall-clock seconds for the whole command"
    )
    parser.add_argument("--sample-ms", type=int, default=100, help="GPU utilisation sample period")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch CPU threads (CPU default 1, as in bench_overlap.py: it leaves the other cores "
        "to the host stages, as a GPU does; GPU default: torch's own)",
    )
    parser.add_argument("--out", type=Path, help="results folder (GPU: benchmarks/results)")
    parser.add_argument("--tmp-dir", help="where the corpus and run dirs go (default: $TMPDIR)")
    parser.add_argument(
        "--model-tmp",
        help="where the saved models go (default: /dev/shm when it has room for the largest "
        "shape twice over, else --tmp-dir)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--model-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    gpu = args.device == "cuda"
    if args.shape is None:
        args.shape = ["qwen2.5-coder-1.5b", "qwen2.5-coder-7b"] if gpu else ["tiny"]
    if args.tokens is None:
        args.tokens = 262_144 if gpu else 16_384
    if args.batch_tokens is None:
        args.batch_tokens = 16_384 if gpu else 4096
    if args.shard_tokens is None:
        args.shard_tokens = 32_768 if gpu else 4096
    if args.torch_threads is None and not gpu:
        args.torch_threads = 1
    return args


def estimate_s(shape: Shape, tokens: int) -> float:
    """Estimated seconds of one shape: fixed costs, then the run and the compute-only pass."""
    return shape.fixed_s + 2.0 * tokens / shape.tokens_per_s


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    started = time.time()
    deadline = started + args.budget_s
    gpu = args.device == "cuda"
    if args.out is None:
        args.out = (
            REPO / "benchmarks" / "results"
            if gpu
            else Path(tempfile.mkdtemp(prefix="gpu_pipeline-smoke-"))
        )
    args.out.mkdir(parents=True, exist_ok=True)
    forwarded = ["--device", args.device, "--tokens", str(args.tokens)]
    forwarded += ["--window", str(args.window), "--overlap", str(args.overlap)]
    forwarded += ["--impl", args.impl]
    forwarded += [
        "--batch-tokens",
        str(args.batch_tokens),
        "--shard-tokens",
        str(args.shard_tokens),
    ]
    forwarded += ["--sample-ms", str(args.sample_ms)]
    if args.torch_threads:
        forwarded += ["--torch-threads", str(args.torch_threads)]
    for name in args.shape:
        forwarded += ["--shape", name]
    if args.tmp_dir:
        forwarded += ["--tmp-dir", args.tmp_dir]
    if args.model_tmp:
        forwarded += ["--model-tmp", args.model_tmp]

    report: dict[str, Any] = {
        "settings": {
            "device": args.device,
            "tokens_per_shape": args.tokens,
            "window": args.window,
            "overlap": args.overlap,
            "k": 10,
            "lookahead": [2, 3],
            "token_sets": TOKEN_SETS,
            "batch_tokens": args.batch_tokens,
            "shard_tokens": args.shard_tokens,
            "lens_impl": args.impl,
            "torch_threads": args.torch_threads,
            "budget_s": args.budget_s,
        },
        "shapes": {},
        "machine": machine_info(),
        "torch_cuda": torch.version.cuda,
        "versions": package_versions(extra=("numpy", "safetensors", "pygments", "nvidia-ml-py")),
        "source_digest": source_digest(),
        "command": "python " + shlex.join(["benchmarks/bench_gpu_pipeline.py", *sys.argv[1:]]),
    }
    for i, name in enumerate(args.shape):
        now = time.time()
        left = deadline - now
        shape = SHAPES[name]
        rest = sum(estimate_s(SHAPES[s], args.tokens) for s in args.shape[i:])
        share = estimate_s(shape, args.tokens) / rest
        if left < shape.fixed_s:
            report["shapes"][name] = {
                "shape": name,
                "state": "skipped",
                "error": f"{left:.0f} s of the budget left, fixed cost ~{shape.fixed_s:.0f} s",
            }
            _write(report, args.out, started)
            continue
        child_deadline = now + left * share
        work = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{name}-", dir=args.tmp_dir))
        model_root = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{name}-", dir=model_dir_root(args)))
        result_file = work / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
        cmd += ["--child-result", str(result_file), "--deadline", repr(child_deadline)]
        cmd += ["--work-dir", str(work), "--model-root", str(model_root), *forwarded]
        print(f"== {name}: {left:.0f} s left, deadline in {child_deadline - now:.0f} s", flush=True)
        try:
            proc = subprocess.run(cmd, timeout=max(10.0, child_deadline - now + GRACE_S))
            text = result_file.read_text() if result_file.exists() else ""
            result = json.loads(text) if text.strip() else {}
            if not result:
                result = {"shape": name, "state": "failed", "error": f"exit code {proc.returncode}"}
        except subprocess.TimeoutExpired:
            result = {
                "shape": name,
                "state": "failed",
                "error": f"killed: ran {GRACE_S:.0f} s past its deadline",
            }
        finally:
            # Also after a killed child: a 15 GB model left in /dev/shm would hold that much RAM.
            shutil.rmtree(model_root, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        result["share_of_budget_s"] = round(child_deadline - now, 1)
        result["child_wall_s"] = round(time.time() - now, 1)  # process start and imports too
        report["shapes"][name] = result
        _write(report, args.out, started)
    print(_markdown(report))
    print(f"written: {args.out / 'gpu_pipeline.json'} and .md", flush=True)
    return report


def _write(report: dict[str, Any], out: Path, started: float) -> None:
    report["wall_s"] = round(time.time() - started, 1)
    report["written_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / "gpu_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_pipeline.md").write_text(_markdown(report))


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return "n/m"
    return f"{value:{spec}}{suffix}"


def _markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        "# End-to-end throughput and device busy time (random-weight Qwen2.5-Coder shapes)",
        "",
        f"`codelens run` as shipped (local executor) on {s['device']}: random bf16 weights saved "
        f"with safetensors and loaded through `load_model`; {s['tokens_per_shape']:,} tokens of "
        f"standard-library files per shape, window {s['window']} (overlap {s['overlap']}), k 10, "
        f"look-ahead [2, 3], two token sets, every layer, `lens.impl: {s['lens_impl']}`, "
        f"batch_tokens "
        f"{s['batch_tokens']:,}, shard_tokens {s['shard_tokens']:,}. 'Run phase' is first "
        "shard planned to last commit (model load and counting pass excluded); 'steady' is first "
        "commit to last; 'compute only' is `LensWorker.compute` over the same shards, device "
        "synchronised. 'GPU busy' is NVML's utilization.gpu averaged over the phase "
        "(n/m: not measured).",
        "",
        "| shape | tokens | run phase tok/s | steady tok/s | compute only tok/s | compute / e2e "
        "| GPU busy, run | GPU busy, compute | useful TFLOP/s (e2e) | GPU peak alloc | load s "
        "| build + save s | host peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, x in r["shapes"].items():
        if x.get("state") != "done":
            lines.append(f"| {name} | {x.get('state')}: {x.get('error')} |" + " |" * 11)
            continue
        e, c, m = x["end_to_end"], x["compute_only"], x["model"]
        tflops = (x.get("useful_tflops") or {}).get("end_to_end")
        lines.append(
            f"| {name} | {e['tokens']:,} | {_fmt(e['tokens_per_s'], ',.0f')} "
            f"| {_fmt(e['steady_tokens_per_s'], ',.0f')} | {_fmt(c['tokens_per_s'], ',.0f')} "
            f"| {_fmt(x.get('compute_over_end_to_end'), '.2f')} "
            f"| {_fmt(e['gpu_busy_mean_pct'], '.0f', ' %')} "
            f"| {_fmt(c['gpu_busy_mean_pct'], '.0f', ' %')} | {_fmt(tflops, '.3g')} "
            f"| {_fmt(e.get('gpu_peak_allocated_gib'), '.1f', ' GiB')} "
            f"| {x['timings_s']['load']:.1f} | {m['build_s'] + m['save_s']:.1f} "
            f"| {_fmt(x['host_peak_rss_gib'], '.1f', ' GiB')} |"
        )
        res = x.get("resolved", {})
        notes.append(
            f"{name}: {m['params'] / 1e9:.2f}B parameters ({m['weight_bytes'] / 2**30:.1f} GiB "
            f"{'/'.join(m['weight_dtypes'])}, built on {m['built_on']}), impl {res.get('impl')}, "
            f"dtype {res.get('dtype')}, {res.get('n_blocks')} blocks, vocab rows "
            f"{res.get('vocab_rows')} (tokenizer {res.get('tokenizer_vocab')}), self-check error "
            f"{_fmt(res.get('self_check_max_abs_err'), '.3g')}; {x['corpus']['files']} files; "
            f"{e['shards']} shards committed (truncated: {e['truncated']}), first commit after "
            f"{_fmt(e['first_commit_s'], '.1f', ' s')}; compute-only {c['shards']} shards "
            f"(truncated: {c['truncated']}); run-phase host RSS peak "
            f"{_fmt(e['host_rss_peak_gib'], '.1f', ' GiB')}; "
            f"{_fmt(x.get('useful_gflop_per_token'), '.3g')} useful GFLOP per token; "
            f"model saved under {Path(x['model_dir']).parent.parent}; "
            f"process {x['process_wall_s']} s."
        )
    m = r["machine"]
    lines += ["", *[f"* {n}" for n in notes], ""]
    lines += [
        f"Useful TFLOP/s: forward `2 * non-embedding params` per input token plus the lens "
        f"`2 * (L + 1) * d * V` per emitted token, against ~{H200_BF16_TFLOPS:.0f} TFLOP/s bf16 "
        "measured on an H200.",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} cores, {m['memory_gib']} GiB, GPU {m['gpu']} "
        f"(CUDA {r['torch_cuda']}), {m['platform']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)
        + f". Source digest {r['source_digest']}. Command: `{r['command']}` "
        f"({r.get('written_at')}, {r.get('wall_s')} s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
