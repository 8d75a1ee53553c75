"""What the logit lens costs: codelens against the recipes people use today.

Every method reads the same model (random weights of a real model's shape, saved once with
safetensors) and the same tokens, computes the full lens (all layers, k = 10, target log-prob and
rank, entropy, KL to the final layer, two look-ahead offsets) and runs in a fresh process, so no
method inherits another's allocator state or warm caches. Reported per method: tokens/s, forward
seconds against lens seconds, the lens stage's working memory (peak growth of resident memory on a
CPU, of allocated memory on a GPU), and agreement with codelens (top-1 equal, max target log-prob
difference). The bound is the bare ``[rows, d] x [d, V]`` matmuls on the same device.

    python benchmarks/bench_lens.py --quick        # CPU, GPT-2-small shape, 512 tokens
    python benchmarks/bench_lens.py                # GPU: Qwen2.5-Coder-1.5B and CodeLlama-7B shapes

Results: ``benchmarks/results/bench_lens-<config>.json`` and the table in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (family, HF config kwargs); random weights of these shapes
SHAPES = {
    "gpt2-small": (
        "gpt2",
        dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=2048),
    ),
    "qwen2.5-coder-1.5b": (
        "qwen2",
        dict(
            num_hidden_layers=28,
            hidden_size=1536,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
    ),
    "codellama-7b": (
        "llama",
        dict(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32016,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
    ),
}
OPTIONAL_METHODS = {"transformer_lens": "transformer_lens", "tuned_lens": "tuned_lens"}


def build_model(shape: str, out: Path, dtype: str) -> Path:
    """Random weights of ``shape`` saved like a checkpoint (config, safetensors, a tokenizer)."""
    import torch
    import transformers

    from codelens.engine.zoo.tiny_models import build_tiny_tokenizer

    if (out / "config.json").exists():
        return out
    family, kwargs = SHAPES[shape]
    config = transformers.AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "weight" in name else p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tiny_tokenizer().save_pretrained(out)
    return out


def _sequences(vocab: int, tokens: int, seq_len: int):
    from codelens.workers.bench import bench_tokens

    ids = bench_tokens(vocab, tokens)
    return [ids[i : i + seq_len] for i in range(0, tokens, seq_len)]


def _run_transformer_lens(loaded, ids):
    """TransformerLens: ``run_with_cache``, ``accumulated_resid(apply_ln=True)``, unembed."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    from codelens.workers.bench import MethodResult, naive_statistics, peak_memory, targets_of

    hf = loaded.model
    if loaded.family != "gpt2":
        raise NotImplementedError(
            "this harness converts GPT-2-family weights only for TransformerLens"
        )
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
        device=str(loaded.device),
    )
    tl_model = HookedTransformer(cfg)
    tl_model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    tl_model.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        logits, cache = tl_model.run_with_cache(ids[None].to(loaded.device))
        forward_s = time.perf_counter() - start
        with peak_memory(loaded.device) as peak:
            start = time.perf_counter()
            resid = cache.accumulated_resid(apply_ln=True)  # [L + 1, 1, T, d]
            per_layer = [tl_model.unembed(resid[i])[0] for i in range(resid.shape[0])]
            top1, target_lp = naive_statistics(per_layer, targets_of(ids), logits[0])
            lens_s = time.perf_counter() - start
    return MethodResult(
        "transformer_lens", ids.numel(), forward_s, lens_s, peak["bytes"], top1, target_lp
    )


def _run_tuned_lens(loaded, ids):
    """tuned-lens: ``LogitLens.from_model`` applied to ``output_hidden_states``."""
    import torch
    from tuned_lens.nn.lenses import LogitLens

    from codelens.workers.bench import MethodResult, naive_statistics, peak_memory, targets_of

    model = loaded.model
    lens = LogitLens.from_model(model)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids[None].to(loaded.device), output_hidden_states=True, use_cache=False)
        forward_s = time.perf_counter() - start
        with peak_memory(loaded.device) as peak:
            start = time.perf_counter()
            hidden = out.hidden_states[:-1]  # the last entry is already normalised: use the logits
            per_layer = [lens(h, idx=i)[0] for i, h in enumerate(hidden)] + [out.logits[0]]
            top1, target_lp = naive_statistics(per_layer, targets_of(ids), out.logits[0])
            lens_s = time.perf_counter() - start
    return MethodResult(
        "tuned_lens", ids.numel(), forward_s, lens_s, peak["bytes"], top1, target_lp
    )


def worker(args: argparse.Namespace) -> None:
    """Run one method over all sequences; print its JSON on the last stdout line."""
    import torch

    from codelens.engine.model.loading import load_model
    from codelens.workers.bench import METHODS, MethodResult

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    run = {"transformer_lens": _run_transformer_lens, "tuned_lens": _run_tuned_lens}.get(
        args.worker
    ) or METHODS[args.worker]
    sequences = _sequences(loaded.parts.head.vocab_size, args.tokens, args.seq_len)
    run(loaded, sequences[0][: min(64, args.seq_len)])  # warm-up on a short prefix, discarded
    results = [run(loaded, ids) for ids in sequences]
    merged = MethodResult(
        args.worker,
        sum(r.tokens for r in results),
        sum(r.forward_s for r in results),
        sum(r.lens_s for r in results),
        max(r.peak_mem_bytes for r in results),
    )
    if results[0].top1 is not None:
        np.savez(
            args.arrays,
            top1=np.concatenate([r.top1 for r in results], 1),
            target_logprob=np.concatenate([r.target_logprob for r in results], 1),
        )
    out = merged.to_json()
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# Driver side.
# ------------------------------------------------------------------------------------------------


def run_config(
    name: str,
    shape: str,
    tokens: int,
    seq_len: int,
    device: str,
    dtype: str,
    methods: list[str],
    cache: Path,
) -> dict:
    model_dir = build_model(shape, cache / f"{shape}-{dtype}", dtype)
    results, arrays = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-lens-"))
    for method in methods:
        if method in OPTIONAL_METHODS:
            try:
                importlib.metadata.version(OPTIONAL_METHODS[method].replace("_", "-"))
            except importlib.metadata.PackageNotFoundError:
                results.append(
                    {
                        "method": method,
                        "skipped": (
                            f"{OPTIONAL_METHODS[method]} is not installed "
                            "(pip install 'code-llm-lens[bench]')"
                        ),
                    }
                )
                continue
        npz = tmp / f"{method}.npz"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--model",
            str(model_dir),
            "--tokens",
            str(tokens),
            "--seq-len",
            str(seq_len),
            "--device",
            device,
            "--dtype",
            dtype,
            "--arrays",
            str(npz),
        ]
        print(f"[{name}] {method} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            results.append({"method": method, "skipped": "failed: " + " | ".join(tail)})
            continue
        res = json.loads(done.stdout.strip().splitlines()[-1])
        if npz.exists():
            arrays[method] = np.load(npz)
        results.append(res)
    ref = arrays.get("codelens")
    bound = next((r for r in results if r.get("method") == "matmul" and "skipped" not in r), None)
    for r in results:
        if "skipped" in r:
            continue
        if ref is not None and r["method"] in arrays:
            a = arrays[r["method"]]
            r["top1_agree"] = float((a["top1"] == ref["top1"]).mean())
            r["max_logprob_diff"] = float(
                np.nanmax(np.abs(a["target_logprob"] - ref["target_logprob"]))
            )
        if bound is not None and r["method"] != "matmul":
            r["lens_fraction_of_bound"] = round(bound["lens_s"] / r["lens_s"], 3)
    return {
        "config": name,
        "shape": shape,
        "tokens": tokens,
        "seq_len": seq_len,
        "device": device,
        "dtype": dtype,
        "results": results,
    }


def markdown(report: dict) -> str:
    lines = [
        f"### {report['config']} — {report['shape']}, {report['tokens']} tokens, "
        f"{report['device']}, {report['dtype']}",
        "",
        f"Machine: {report['machine']}  ",
        f"Versions: {report['versions']}  ",
        f"Command: `{report['command']}` ({report['written_at']})",
        "",
        "| method | tokens/s | forward s | lens s | lens / forward | lens working memory "
        "| lens vs matmul bound | top-1 agree | max logprob diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | — skipped: {r['skipped']} | | | | | | | |")
            continue

        def f(key, fmt="{:.3g}", r=r):
            v = r.get(key)
            return "" if v is None else fmt.format(v)

        mem = r["peak_mem_bytes"] / 2**20
        lines.append(
            f"| {r['method']} | {f('tokens_per_s', '{:,.0f}')} | {f('forward_s', '{:.2f}')} | "
            f"{f('lens_s', '{:.2f}')} | {f('lens_over_forward', '{:.2f}')} | {mem:,.0f} MiB | "
            f"{f('lens_fraction_of_bound', '{:.2f}')} | "
            f"{f('top1_agree', '{:.4f}')} | {f('max_logprob_diff', '{:.2e}')} |"
        )
    return "\n".join(lines) + "\n"


def write_results_md() -> None:
    """Regenerate benchmarks/RESULTS.md from every results/bench_lens-*.json."""
    parts = [
        "# Lens cost benchmarks\n",
        "Generated by `benchmarks/bench_lens.py` from `benchmarks/results/bench_lens-*.json`; "
        "do not edit by hand.",
        "'lens vs matmul bound' = (seconds of the bare `[rows, d] x [d, V]` matmuls) / "
        "(the method's lens seconds).\n",
    ]
    for path in sorted(RESULTS.glob("bench_lens-*.json")):
        parts.append(markdown(json.loads(path.read_text())))
    (HERE / "RESULTS.md").write_text("\n".join(parts))


def main() -> None:
    from codelens.workers.bench import machine_info
    from codelens.workers.job import package_versions

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, GPT-2-small shape, 512 tokens")
    p.add_argument("--methods", default="codelens,naive,transformer_lens,tuned_lens,matmul")
    p.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "codelens-bench-models"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--arrays", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    methods = args.methods.split(",")
    if args.quick:
        configs = [("quick", "gpt2-small", 512, 512, "cpu", "float32")]
    else:
        import torch

        if not torch.cuda.is_available():
            print("the full configuration needs a CUDA GPU; use --quick on a CPU", file=sys.stderr)
            return
        configs = [
            ("gpu-qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b", 65536, 2048, "cuda", "bfloat16"),
            ("gpu-codellama-7b", "codellama-7b", 65536, 2048, "cuda", "bfloat16"),
        ]
    RESULTS.mkdir(exist_ok=True)
    for name, shape, tokens, seq_len, device, dtype in configs:
        report = run_config(name, shape, tokens, seq_len, device, dtype, methods, args.cache)
        report.update(
            machine=machine_info(),
            versions=package_versions(extra=("transformer-lens", "tuned-lens", "numpy")),
            command=" ".join([Path(sys.executable).name, *sys.argv]),
            written_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (RESULTS / f"bench_lens-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(markdown(report))
    write_results_md()


if __name__ == "__main__":
    main()
