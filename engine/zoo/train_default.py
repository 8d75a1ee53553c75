"""Train the bundled default model ``codelens-debian-code`` from scratch on a CPU.

    python -m codelens.engine.zoo.train_default --out DIR [--seed 0] [--minutes 95] [--steps N]
    python -m codelens.workers.model_card DIR   # then (re)write DIR/MODEL_CARD.md

What it does (everything local; nothing is downloaded):

1. Data: Python's standard library, C headers, Perl modules and shell scripts as a Debian machine
   ships them, each split into train / held-out files by :mod:`codelens.engine.zoo.code_sources`
   (~5% held out by a hash of the path; per-language byte caps; ``--languages`` picks a subset).
2. Tokenizer: a byte-level BPE (``tokenizers``) with ``<s>``, ``</s>``, ``<pad>``, trained on the
   *train* files of every language to ``--vocab`` tokens (default 4096), saved as a
   ``PreTrainedTokenizerFast``.
3. Model: ``LlamaForCausalLM`` (RMSNorm, SwiGLU, RoPE, untied head), default 8 layers, d 160,
   5 heads, SwiGLU width 448, vocabulary 4096 (3.9M parameters).
4. Training: each file becomes ``<s> tokens </s>``; the files are concatenated and cut into
   sequences of ``--ctx`` tokens (packed), shuffled by a seeded generator each epoch. AdamW
   (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup then cosine decay to 10%, gradient
   clipping at 1.0. With ``--minutes`` the first ``--calib-steps`` steps measure the throughput and
   the cosine schedule is sized to end at the time budget; training also stops at the deadline.
   ``--steps N`` fixes the schedule instead (bit-for-bit reproducible on one thread with the same
   seed, data and library versions; ``training_log.json`` records the step count a timed run
   reached, so ``--steps`` with that number reproduces it).
5. Evaluation: held-out loss every ``--eval-every`` steps on a fixed subset (the same number of
   sequences from each language: the curve), then loss and top-1 accuracy of the weights *as
   shipped* (cast to ``--save-dtype`` and back to fp32, as ``load_model`` reads them on a CPU)
   on every held-out position of each language.
6. Output: ``config.json``, ``model.safetensors`` (bf16 by default), tokenizer files and
   ``training_log.json`` in ``--out``. ``MODEL_CARD.md`` is written separately, by
   ``python -m codelens.workers.model_card DIR``: it also quotes the lens figures of a lens run
   over the held-out files, and running a job is the workers' business, not the engine's. This
   module only formats the card (:func:`write_model_card`) from the ``summary.json`` it is given.

Run it with one thread (``OMP_NUM_THREADS=1``; the script also calls ``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from codelens.engine.zoo.code_sources import (
    HELD_OUT_MODULUS,
    SOURCES,
    SourceFile,
    read_text,
    split,
    stdlib_root,
)
from codelens.engine.zoo.tiny_models import train_bpe_tokenizer


def read_texts(files: tuple[SourceFile, ...]) -> tuple[list[str], list[str]]:
    """``(texts, keys)`` of the files that decode as UTF-8 and are not blank."""
    texts, keys = [], []
    for f in files:
        text = read_text(f)
        if text is not None:
            texts.append(text)
            keys.append(f.key)
    return texts, keys


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """``<s> text </s>`` for every text, concatenated (int64)."""
    ids: list[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.append(bos)
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def as_sequences(stream: torch.Tensor, ctx: int) -> torch.Tensor:
    """``[n, ctx]`` consecutive chunks of ``stream`` (the tail shorter than ``ctx`` is dropped)."""
    n = stream.numel() // ctx
    return stream[: n * ctx].view(n, ctx)


def _os_name() -> str:
    """The machine's OS as os-release names it (``Debian GNU/Linux 12 (bookworm)``)."""
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.platform())
    except OSError:
        return platform.platform()


def lr_at(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_with_top1(
    model: LlamaForCausalLM, seqs: torch.Tensor, batch: int
) -> tuple[float, float]:
    """``(mean next-token cross-entropy in nats, top-1 accuracy)`` over every predicted position."""
    model.eval()
    total, hits, count = 0.0, 0, 0
    for i in range(0, seqs.shape[0], batch):
        x = seqs[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total += loss.item()
        hits += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    model.train()
    return total / max(1, count), hits / max(1, count)


def evaluate(model: LlamaForCausalLM, seqs: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of ``seqs``."""
    return evaluate_with_top1(model, seqs, batch)[0]


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=95.0, help="training time budget (wall clock)")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (overrides timing)")
    p.add_argument("--calib-steps", type=int, default=30, help="steps timed to size the schedule")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=160)
    p.add_argument("--ffn", type=int, default=448)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--ctx", type=int, default=256, help="training sequence length")
    p.add_argument("--max-positions", type=int, default=2048, help="config max_position_embeddings")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-seqs", type=int, default=48, help="held-out sequences in periodic evals")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--languages",
        nargs="+",
        default=list(SOURCES),
        choices=list(SOURCES),
        help="languages to train on (code_sources.SOURCES)",
    )
    p.add_argument("--save-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # Per language: training and held-out texts (a language absent on this machine is skipped).
    train_by_lang: dict[str, list[str]] = {}
    held_by_lang: dict[str, list[str]] = {}
    held_keys: dict[str, list[str]] = {}
    for language in args.languages:
        train_files, held_files = split(language)
        texts, _ = read_texts(train_files)
        held, keys = read_texts(held_files)
        if texts and held:
            train_by_lang[language], held_by_lang[language], held_keys[language] = texts, held, keys
        print(f"data: {language}: {len(texts)} train / {len(held)} held-out files", flush=True)
    if not train_by_lang:
        raise SystemExit(
            f"no training data: none of {', '.join(args.languages)} has both training and held-out "
            "files on this machine (see codelens.engine.zoo.code_sources for where each is read)"
        )
    train_texts = [t for texts in train_by_lang.values() for t in texts]

    tokenizer = train_bpe_tokenizer(train_texts, args.vocab, max_length=args.max_positions)
    assert len(tokenizer) <= args.vocab, (len(tokenizer), args.vocab)
    # Each language tokenized once; the training stream is their concatenation (in file order,
    # so it equals token_stream over all training texts).
    train_streams = {lang: token_stream(tokenizer, t) for lang, t in train_by_lang.items()}
    held_streams = {lang: token_stream(tokenizer, t) for lang, t in held_by_lang.items()}
    train_stream = torch.cat(list(train_streams.values()))
    train_seqs = as_sequences(train_stream, args.ctx)
    held_seqs_by_lang = {lang: as_sequences(x, args.ctx) for lang, x in held_streams.items()}
    # A language whose held-out files hold less than one sequence cannot be evaluated: say so.
    for lang in [lang for lang, seqs in held_seqs_by_lang.items() if seqs.shape[0] == 0]:
        print(f"data: {lang}: held-out files shorter than --ctx; not evaluated", flush=True)
        del held_seqs_by_lang[lang]
    if not held_seqs_by_lang:
        raise SystemExit(f"no language has {args.ctx} held-out tokens to evaluate on")
    # The periodic eval: the same number of held-out sequences of every language.
    per_lang = max(1, args.eval_seqs // len(held_seqs_by_lang))
    eval_seqs = torch.cat(
        [
            seqs[torch.linspace(0, seqs.shape[0] - 1, min(per_lang, seqs.shape[0])).long()]
            for seqs in held_seqs_by_lang.values()
        ]
    )
    data_log = {
        lang: {
            "train_files": len(train_by_lang[lang]),
            "held_out_files": len(held_by_lang[lang]),
            "train_tokens": int(train_streams[lang].numel()),
            "held_out_tokens": int(held_streams[lang].numel()),
            "train_bytes": sum(len(t.encode()) for t in train_by_lang[lang]),
            "source": SOURCES[lang].description,
            "licence": SOURCES[lang].licence,
            "held_out_files_list": held_keys[lang],
        }
        for lang in train_by_lang
    }
    print(
        f"tokenizer: {len(tokenizer)} tokens; train {train_stream.numel():,} tokens "
        f"({train_seqs.shape[0]} seqs of {args.ctx}); "
        + ", ".join(f"{lang} {d['train_tokens']:,}" for lang, d in data_log.items())
        + f"; bytes/token {sum(len(t.encode()) for t in train_texts) / train_stream.numel():.2f} "
        f"({time.time() - t_start:.0f}s)",
        flush=True,
    )

    model = build_model(args, tokenizer)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(train_seqs.shape[0], generator=gen)
    cursor, epoch = 0, 0

    total_steps = args.steps if args.steps is not None else 10**9  # sized after calibration
    deadline = time.time() + args.minutes * 60 if args.steps is None else float("inf")
    t_train = time.time()
    curve: list[dict[str, Any]] = []
    step, tokens_seen, running = 0, 0, None
    sec_per_step = None
    eval_time = 0.0

    def curve_row(held_out_loss: float) -> dict[str, Any]:
        """The training curve's entry for the current step (read when called)."""
        return {
            "step": step,
            "tokens": tokens_seen,
            "epoch": epoch,
            "lr": lr,
            "train_loss": round(loss.item(), 4),
            "train_loss_ema": round(running, 4),
            "held_out_loss": round(held_out_loss, 4),
            "elapsed_s": round(time.time() - t_train, 1),
        }

    while step < total_steps and time.time() < deadline:
        if cursor + args.batch > order.numel():
            order = torch.randperm(train_seqs.shape[0], generator=gen)
            cursor, epoch = 0, epoch + 1
        x = train_seqs[order[cursor : cursor + args.batch]]
        cursor += args.batch
        lr = lr_at(step, peak=args.lr, warmup=args.warmup, total=total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()

        if args.steps is None and step == args.calib_steps:
            sec_per_step = (time.time() - t_train) / step
            # Evals cost about eval_seqs forward passes (~1/3 of a training step per sequence).
            n_evals_guess = args.minutes * 60 / sec_per_step / args.eval_every
            eval_cost = n_evals_guess * (args.eval_seqs / args.batch) * sec_per_step / 3
            budget = args.minutes * 60 - (time.time() - t_train) - eval_cost
            total_steps = step + max(1, int(budget / sec_per_step * 0.97))
            print(
                f"calibration: {sec_per_step:.3f} s/step = {x.numel() / sec_per_step:.0f} tok/s; "
                f"schedule sized to {total_steps} steps",
                flush=True,
            )
        elif (
            args.steps is None
            and sec_per_step is not None
            and step % args.eval_every == 0
            and step < total_steps // 2
        ):
            # Re-size the schedule from the rate so far (the machine may be shared): only in the
            # first half, where the cosine is still near its peak and a change barely matters.
            rate = (time.time() - t_train) / step
            left = deadline - time.time() - eval_time * (total_steps - step) / step
            total_steps = step + max(1, int(left / rate * 0.97))
            print(f"re-sized: {rate:.3f} s/step, schedule {total_steps} steps", flush=True)
        if step % args.eval_every == 0 or step == total_steps or step == 1:
            t_eval = time.time()
            row = curve_row(evaluate(model, eval_seqs, args.batch))
            eval_time += time.time() - t_eval
            curve.append(row)
            print(json.dumps(row), flush=True)
    train_seconds = time.time() - t_train
    if not curve or curve[-1]["step"] != step:
        curve.append(curve_row(evaluate(model, eval_seqs, args.batch)))

    # Ship: cast to the save dtype; evaluate the shipped weights upcast to fp32 (load_model on CPU).
    save_dtype = getattr(torch, args.save_dtype)
    model.eval()
    model.to(save_dtype)
    model.config.dtype = save_dtype
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.to(torch.float32)
    final_by_lang: dict[str, dict[str, Any]] = {}
    for lang, seqs in held_seqs_by_lang.items():
        t_eval = time.time()
        loss_lang, top1_lang = evaluate_with_top1(model, seqs, args.batch)
        final_by_lang[lang] = {
            "held_out_loss": round(loss_lang, 4),
            "held_out_perplexity": round(math.exp(loss_lang), 3),
            "held_out_top1": round(top1_lang, 4),
            "held_out_eval_tokens": int(seqs[:, 1:].numel()),
        }
        print(
            f"final held-out {lang} (shipped weights, {seqs.numel():,} tokens): loss "
            f"{loss_lang:.4f} ppl {math.exp(loss_lang):.2f} top-1 {top1_lang:.4f} "
            f"({time.time() - t_eval:.0f}s)",
            flush=True,
        )
    n_eval = sum(f["held_out_eval_tokens"] for f in final_by_lang.values())
    full_held = sum(f["held_out_loss"] * f["held_out_eval_tokens"] for f in final_by_lang.values())
    full_held /= max(1, n_eval)

    log = {
        "model": {
            "architecture": "LlamaForCausalLM",
            "layers": args.layers,
            "d_model": args.d_model,
            "ffn": args.ffn,
            "heads": args.heads,
            "vocab": args.vocab,
            "parameters": n_params,
            "non_embedding_parameters": n_params - 2 * args.vocab * args.d_model,
            "save_dtype": args.save_dtype,
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {
            "stdlib": str(stdlib_root()),
            "python": platform.python_version(),
            "os": _os_name(),
            "held_out_rule": f"int(sha256(key), 16) % {HELD_OUT_MODULUS} == 0 (key: the path "
            "relative to the language's root; absolute for shell scripts)",
            "python_excluded": "site-packages/, test/, tests/, idle_test/ directories, test_*.py",
            "train_files": sum(d["train_files"] for d in data_log.values()),
            "held_out_files": sum(d["held_out_files"] for d in data_log.values()),
            "train_tokens": int(train_stream.numel()),
            "held_out_tokens": sum(d["held_out_tokens"] for d in data_log.values()),
            "languages": data_log,
        },
        "training": {
            "steps": step,
            "scheduled_steps": total_steps,
            "schedule": (
                "timed (calibrated, re-sized in the first half)"
                if args.steps is None
                else "fixed --steps"
            ),
            "tokens_seen": tokens_seen,
            "epochs": tokens_seen / max(1, train_seqs.numel()),
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(eval_time, 1),
            "calibration_sec_per_step": sec_per_step,
            "tokens_per_second": round(tokens_seen / max(1e-9, train_seconds - eval_time)),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
        "final": {
            "held_out_loss": round(full_held, 4),
            "held_out_perplexity": round(math.exp(full_held), 3),
            "held_out_eval_tokens": n_eval,
            "weights": args.save_dtype + " upcast to float32",
            "by_language": final_by_lang,
        },
        "curve": curve,
        "total_seconds": round(time.time() - t_start, 1),
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved to {out} ({time.time() - t_start:.0f}s total)", flush=True)
    return log


# --------------------------------------------------------------------------------------------------
# MODEL_CARD.md: training figures from training_log.json + lens figures from a lens run's summary
# (the run itself: codelens.workers.model_card).
# --------------------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def lens_curves_markdown(summary: dict[str, Any]) -> str:
    """Per-layer lens tables of a held-out run: all languages, then one per document language.

    The published curves (``MODEL_CARD.md`` and ``benchmarks/results``): top-1 accuracy, mean
    target log-prob, mean KL to the final layer, mean entropy and the median rank per layer.
    """

    def table(rows: list[dict[str, Any]]) -> str:
        head = (
            "| layer | top-1 accuracy | mean target log-prob | mean KL to final | mean entropy "
            "| median rank |\n|---:|---:|---:|---:|---:|---:|\n"
        )
        return head + "\n".join(
            f"| {layer} | {_fmt(r.get('top1_accuracy'))} | {_fmt(r.get('mean_target_logprob'))} "
            f"| {_fmt(r.get('mean_kl_final'))} | {_fmt(r.get('mean_entropy'))} "
            f"| {(r.get('target_rank_quantiles') or {}).get('p50', '-')} |"
            for layer, r in rows
        )

    layers = summary["layers"]
    parts = [
        f"**All held-out files** ({layers[-1]['count']:,} predicted tokens)\n\n"
        + table([(r["layer"], r) for r in layers])
    ]
    for language, group in layers[-1].get("by_language", {}).items():
        per_layer = [(r["layer"], r.get("by_language", {}).get(language, {})) for r in layers]
        parts.append(f"**{language}** ({group['count']:,} predicted tokens)\n\n" + table(per_layer))
    return "\n\n".join(parts)


def seed_findings_markdown(summary: dict[str, Any]) -> str:
    """What the seeds' three findings look like on a held-out run (bullets)."""
    layers = summary["layers"]
    last = layers[-1]
    out = []
    seen, novel = last.get("by_seen", {}).get("seen"), last.get("by_seen", {}).get("novel")
    conv = summary.get("convergence", {})
    if seen and novel:
        c_seen = conv.get("by_seen", {}).get("seen", {}).get("mean_layer")
        c_novel = conv.get("by_seen", {}).get("novel", {}).get("mean_layer")
        out.append(
            f"* **Copying** (seed 002): at the output, targets seen earlier in the file have top-1 "
            f"{_fmt(seen['top1_accuracy'])} and mean log-prob {_fmt(seen['mean_target_logprob'])}, "
            f"novel ones {_fmt(novel['top1_accuracy'])} and "
            f"{_fmt(novel['mean_target_logprob'])}; mean convergence layer {_fmt(c_seen, 2)} vs "
            f"{_fmt(c_novel, 2)}. By layer, the seen targets' log-prob: "
            + ", ".join(
                _fmt(r.get("by_seen", {}).get("seen", {}).get("mean_target_logprob"), 2)
                for r in layers
            )
            + "."
        )
    rare = [
        (int(b), g)
        for b, g in last.get("by_freq_bucket", {}).items()
        if int(b) <= 1 and g.get("count")
    ]
    if rare:
        n = sum(g["count"] for _, g in rare)
        hits = sum(g["top1_accuracy"] * g["count"] for _, g in rare) / n
        out.append(
            f"* **Rare tokens** (at most 3 occurrences in the held-out corpus, {n:,} targets): "
            f"top-1 {hits:.3f} at the output."
        )
    kl = [r.get("mean_kl_final") for r in layers]
    if len(layers) > 2 and None not in kl and kl[0]:
        drops = [a - b for a, b in zip(kl, kl[1:], strict=False)]
        biggest = layers[1 + drops.index(max(drops))]["layer"]
        out.append(
            f"* **The first block** (seed 003): KL to the output goes from {kl[0]:.2f} nats at the "
            f"embeddings to {kl[1]:.2f} after block 1 ({100 * drops[0] / kl[0]:.0f}% of it); "
            + (
                "no later block removes more."
                if biggest == layers[1]["layer"]
                else f"the largest drop is after block {biggest} "
                f"({max(drops):.2f} nats), so on this model the late blocks do most of the work."
            )
        )
    by_lang = last.get("by_language", {})
    detours = []
    for language in by_lang:
        per_layer = [r.get("by_language", {}).get(language, {}) for r in layers]
        masses = [(p.get("token_set_mean_mass") or {}) for p in per_layer]
        for name in masses[-1]:
            if name == language:
                continue
            middle = [m.get(name) or 0.0 for m in masses[1:-1]]
            if middle and masses[-1].get(name) is not None:
                peak = max(middle)
                detours.append(
                    (
                        peak / max(masses[-1][name], 1e-12),
                        language,
                        name,
                        peak,
                        masses[-1][name],
                        layers[1 + middle.index(peak)]["layer"],
                    )
                )
    if detours:
        ratio, language, name, peak, final, layer = max(detours)
        out.append(
            f"* **The detour** (seed 000): the largest one is in {language} files, whose layer "
            f"{layer} puts a mean {peak:.2%} on {name} keywords against {final:.2%} at the output "
            f"({ratio:.1f}x)."
        )
    return "\n".join(out)


def write_model_card(model_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``MODEL_CARD.md`` from ``training_log.json`` and a lens run's ``summary.json``.

    ``summary`` also carries ``_files``, the number of files the run read (the card quotes it);
    ``codelens.workers.model_card`` runs the job and passes it here.
    """
    log = json.loads((model_dir / "training_log.json").read_text())
    m, d, t, f = log["model"], log["data"], log["training"], log["final"]
    size = (model_dir / "model.safetensors").stat().st_size
    curve = log["curve"]
    keep = sorted({0, len(curve) - 1, *range(0, len(curve), max(1, len(curve) // 12))})
    curve_rows = "\n".join(
        f"| {curve[i]['step']} | {curve[i]['tokens'] / 1e6:.2f} | {curve[i]['elapsed_s'] / 60:.1f} "
        f"| {curve[i]['lr']:.2e} | {curve[i]['train_loss_ema']:.3f} "
        f"| {curve[i]['held_out_loss']:.3f} |"
        for i in keep
    )
    a = log["args"]
    languages = d["languages"]
    data_rows = "\n".join(
        f"| {lang} | {x['source']} | {x['licence']} | {x['train_files']} | {x['train_tokens']:,} "
        f"| {x['held_out_files']} | {x['held_out_tokens']:,} |"
        for lang, x in languages.items()
    )
    final_rows = "\n".join(
        f"| {lang} | {x['held_out_loss']:.3f} | {x['held_out_perplexity']:.1f} "
        f"| {x['held_out_top1']:.3f} | {x['held_out_eval_tokens']:,} |"
        for lang, x in f["by_language"].items()
    )
    shape = (
        f"{m['layers']} / {m['d_model']} / {m['heads']} (head dim {m['d_model'] // m['heads']}), "
        f"MLP width {m['ffn']}"
    )
    params = (
        f"{m['parameters']:,} ({m['non_embedding_parameters']:,} outside the embedding and "
        "unembedding)"
    )
    training_command = (
        f"python -m codelens.engine.zoo.train_default --out DIR --seed {a['seed']} "
        f"--minutes {a['minutes']:g}"
    )
    vocabulary = (
        f"{m['vocab']} (byte-level BPE trained on the training files of every language; "
        "`<s>`=0, `</s>`=1, `<pad>`=2)"
    )
    context = (
        f"{a['ctx']} tokens (`max_position_embeddings` {a['max_positions']}: RoPE; longer "
        "windows run but were never trained)"
    )
    weights = (
        f"`model.safetensors`, {m['save_dtype']}, {size / 2**20:.2f} MiB (`load_model` upcasts "
        "to float32 on a CPU)"
    )
    text = f"""# codelens-debian-code

The default model of `codelens demo`: a small decoder-only code LM trained from scratch on code in
{len(languages)} languages that every Debian machine ships ({", ".join(languages)}: from
Python's standard library, C headers, Perl modules, shell scripts), so that the logit lens has a
*trained*, multilingual model to look at without downloading anything. It is a toy (about
{t["train_seconds"] / 60:.0f} minutes of training on {t["threads"]} CPU thread(s)): use it to see
what the lens shows and to test the pipeline, not to study a real code LLM.

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM` (RMSNorm, SwiGLU MLP, RoPE, untied `lm_head`) |
| layers / width / heads | {shape} |
| parameters | {params} |
| vocabulary | {vocabulary} |
| training context | {context} |
| weights | {weights} |

## Data, sources and licences

Files as installed on the training machine ({d.get("os", "Debian")}, Python {d["python"]} at
`{d["stdlib"]}`);
`codelens.engine.zoo.code_sources` finds them on any Debian machine. Each file keeps the licence
of the package it comes from (`dpkg -S FILE` names the package, `/usr/share/doc/PKG/copyright`
gives its terms); the model is trained on them, not redistributing them.

| language | files | licence | train files | train tokens | held-out files | held-out tokens |
|---|---|---|---:|---:|---:|---:|
{data_rows}

* Held out: `{d["held_out_rule"]}` (~5% of each language's files). Neither the tokenizer nor the
  model saw a held-out file. Python excludes {d["python_excluded"]}; C skips headers with C++ in
  them. Files above 200 kB are skipped, and each language's files are taken in path-hash order up
  to a byte cap (`code_sources.SOURCES`), so that C and Perl do not drown out Python.
* Each file is `<s> text </s>`; files are concatenated and cut into {a["ctx"]}-token sequences.

## Training

`{training_command}`
({t["threads"]} CPU thread(s)). AdamW (betas 0.9/0.95, weight decay {a["weight_decay"]} on
matrices), peak learning rate {a["lr"]:g}, {a["warmup"]} warmup steps then cosine decay to
10%, gradient clipping 1.0, batch {a["batch"]} x {a["ctx"]} = {a["batch"] * a["ctx"]:,} tokens
per step.

* {t["steps"]} steps, {t["tokens_seen"]:,} tokens seen ({t["epochs"]:.2f} epochs) in
  {t["train_seconds"] / 60:.1f} min on {t["threads"]} thread(s) of a {t["cpu"]} CPU
  ({t["tokens_per_second"]:,} tokens/s), torch {t["torch"]}, transformers {t["transformers"]}.
* The timed schedule was sized from the measured throughput; `--steps {t["steps"]}` replays the
  same number of steps with a fixed schedule.

Training curve (train loss: exponential moving average; held-out loss on a fixed subset of
{a["eval_seqs"]} held-out sequences, the same number from each language), nats per token:

| step | tokens (M) | minutes | lr | train loss | held-out loss |
|---:|---:|---:|---:|---:|---:|
{curve_rows}

**Held-out figures of the shipped weights** (every held-out position of each language,
{a["ctx"]}-token sequences; uniform over the vocabulary would be {math.log(m["vocab"]):.2f} nats):

| language | loss (nats/token) | perplexity | top-1 accuracy | positions |
|---|---:|---:|---:|---:|
{final_rows}

## What the lens shows (held-out files)

From a real `codelens run` over all {summary["_files"]} held-out files ({summary.get("tokens", 0):,}
positions; windows of 256 tokens with 32 of overlap, BOS added, float32 on a CPU; one keyword set
per language: words that are one token, shared words removed), read from its `summary.json`.
Layer 0 is the embedding output read through the final norm and `lm_head`; layer {m["layers"]}
is the model's own output. Median rank is the lower edge of its power-of-two histogram bin
(rank 0 = top-1).

{lens_curves_markdown(summary)}

The seeds' questions on this model:

{seed_findings_markdown(summary)}

`tests/engine/zoo/test_default_model.py` checks the trends on a small held-out sample.

## Limitations

Trained on a few megabytes of system code for under two hours on a CPU: it knows the surface
syntax and idioms of {", ".join(languages)} and little else. The split is by file, not by
package, so near-duplicate files (the `encodings/cp*.py` code pages, generated headers) can
sit on both sides.
"""
    path = model_dir / "MODEL_CARD.md"
    path.write_text(text)
    return path


if __name__ == "__main__":
    if "--card-only" in sys.argv:
        # The card quotes a lens run, and the engine runs no jobs: that step is a workers module.
        sys.exit("MODEL_CARD.md is written by: python -m codelens.workers.model_card MODEL_DIR")
    main(sys.argv[1:])
