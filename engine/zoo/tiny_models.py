"""Tiny random models of every supported family, saved like real checkpoints.

``build_tiny_model(out_dir, "gemma2")`` writes a directory that ``load_model`` reads exactly as it
reads a downloaded model: ``config.json``, ``model.safetensors`` and a fast tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``). Tests use these to run the real loading path
without a hub, and ``codelens demo`` uses them to show the pipeline end to end on a laptop.

What makes them useful as test data rather than just small:

- a byte-level BPE tokenizer trained on Python source (a few standard-library files of the running
  interpreter), so code snippets tokenize into realistic multi-byte pieces;
- ``vocab_size`` rounded *up* past the tokenizer's size, so the unembedding has padded rows that no
  token maps to (CodeLlama's 32016, Qwen2.5-Coder's 151936 vs 151665);
- every 1-D parameter (norm weights and biases, ``lm_head`` bias) is perturbed away from its
  constant init, so a lens that drops a LayerNorm bias, Gemma's ``1 + w`` or CodeGen's head bias
  is visibly wrong instead of accidentally right;
- the per-family post-processing is switched on with values that bite at this scale: Gemma-2's
  soft-cap is small enough to bend the tiny model's logits, Granite's ``logits_scaling`` and
  ``embedding_multiplier`` differ from 1;
- tied and untied unembeddings both occur (each family follows its real checkpoints' default).

Each model plus tokenizer builds in well under a second; the tokenizer is trained once per process.
"""

from __future__ import annotations

import functools
import inspect
import math
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from codelens.engine.model.loading import auto_model_class

TINY_FAMILIES: tuple[str, ...] = (
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "codegen",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "starcoder2",
    "gemma",
    "gemma2",
    "phi3",
    "granite",
)
"""Family names accepted by :func:`build_tiny_model` (each equals the HF ``model_type``)."""

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

TOKENIZER_TARGET_SIZE = 400
"""BPE vocabulary target: 256 byte symbols + 3 specials + 141 merges (enough for ``def``,
``return`` and newline-plus-indent runs to become single tokens). 400 is deliberately not a
multiple of 64: rounding the model's vocabulary up to 448 leaves 48 padded unembedding rows."""

VOCAB_MULTIPLE = 64
"""The model's ``vocab_size`` is the tokenizer size rounded up to this (Megatron-style padding)."""

DEFAULT_CORPUS_FILES: tuple[str, ...] = (
    "textwrap.py",
    "bisect.py",
    "heapq.py",
    "fnmatch.py",
    "colorsys.py",
    "keyword.py",
)
"""Standard-library modules the default tokenizer is trained on, in this fixed order."""

_FALLBACK_TEXT = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''
"""Used only if none of ``DEFAULT_CORPUS_FILES`` can be read (interpreter without its sources)."""

INIT_STD = 0.2
"""``initializer_range`` of every tiny model: about ``1 / sqrt(d_model)`` for d = 32, so logits come
out O(1) (HF's default 0.02 gives near-uniform distributions where top-k and ranks are all ties)."""

PERTURB_STD = 0.1
"""Noise added to every 1-D parameter after init (norm weights/biases start at exact constants)."""


def default_tokenizer_texts() -> tuple[str, ...]:
    """Texts of the standard-library files in ``DEFAULT_CORPUS_FILES`` (deterministic order).

    Returns:
        One string per readable file; a built-in snippet if none could be read.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in DEFAULT_CORPUS_FILES:
        try:
            texts.append((stdlib / name).read_text(encoding="utf-8"))
        except OSError:
            continue
    return tuple(texts) or (_FALLBACK_TEXT,)


def _bpe_json(texts: Iterable[str], vocab_size: int) -> str:
    """A byte-level BPE trained on ``texts``, as tokenizer.json text."""
    tokenizer = Tokenizer(models.BPE())
    # Byte-level like GPT-2 / StarCoder / Llama-3: every string is encodable, no unknown token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer.to_str()


def _fast_tokenizer(tokenizer_json: str, max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
    )


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<s>`` / ``</s>`` / ``<pad>`` (ids 0, 1, 2) trained on ``texts``.

    The tokenizer of every tiny model and of the bundled default model. It does not add BOS/EOS
    by itself: the corpus tokenizer decides that.

    Args:
        texts: training texts.
        vocab_size: BPE vocabulary size to train to (including the 256 byte symbols).
        max_length: the tokenizer's ``model_max_length``.
    """
    return _fast_tokenizer(_bpe_json(texts, vocab_size), max_length)


@functools.lru_cache(maxsize=8)
def _cached_bpe_json(texts: tuple[str, ...], vocab_size: int) -> str:
    """:func:`_bpe_json`, cached per process (tests build many tiny models from the same texts)."""
    return _bpe_json(texts, vocab_size)


def build_tiny_tokenizer(
    texts: Iterable[str] | None = None, target_size: int = TOKENIZER_TARGET_SIZE
) -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer (:func:`train_bpe_tokenizer`), trained once per process.

    Args:
        texts: training texts; the standard-library files of ``DEFAULT_CORPUS_FILES`` if None.
        target_size: BPE vocabulary size to train to (including the 256 byte symbols).
    """
    texts = default_tokenizer_texts() if texts is None else tuple(texts)
    return _fast_tokenizer(_cached_bpe_json(texts, target_size), 2048)


# --------------------------------------------------------------------------------------------------
# Config builders: one per family, all tiny (2 layers, d 32, 4 heads of 8 by default).
# Each receives the common sizes and returns that family's config with its real-checkpoint quirks.
# --------------------------------------------------------------------------------------------------

_MAX_POSITIONS = 2048
"""Learned position tables (GPT-2, GPT-BigCode) must cover the longest window a demo asks for."""


def _common(
    vocab_size: int, n_layers: int, d_model: int, special: dict[str, int]
) -> dict[str, Any]:
    """Keys every config class understands (through its ``attribute_map`` where names differ)."""
    return dict(
        vocab_size=vocab_size,
        num_hidden_layers=n_layers,
        hidden_size=d_model,
        num_attention_heads=4,
        initializer_range=INIT_STD,
        **special,
    )


def _llama_like(d_model: int) -> dict[str, Any]:
    return dict(intermediate_size=2 * d_model, max_position_embeddings=_MAX_POSITIONS)


def _gpt2(c: dict[str, Any], d: int) -> PretrainedConfig:
    # Tied, LayerNorm with bias; eps 1e-5 like the real model.
    return transformers.GPT2Config(n_positions=_MAX_POSITIONS, n_inner=2 * d, **c)


def _gpt_bigcode(c: dict[str, Any], d: int) -> PretrainedConfig:
    # StarCoder/SantaCoder: multi-query attention, tied head.
    return transformers.GPTBigCodeConfig(
        n_positions=_MAX_POSITIONS, n_inner=2 * d, multi_query=True, **c
    )


def _gpt_neox(c: dict[str, Any], d: int) -> PretrainedConfig:
    # Pythia / PolyCoder-style: untied `embed_out`, partial rotary.
    return transformers.GPTNeoXConfig(
        intermediate_size=2 * d,
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=False,
        **c,
    )


def _codegen(c: dict[str, Any], d: int) -> PretrainedConfig:
    # CodeGen: untied lm_head *with bias*; rotary on the first `rotary_dim` dims of each head.
    # Its attention splits qkv into 4 model-parallel groups, so d_model must be divisible by 4.
    return transformers.CodeGenConfig(
        n_positions=_MAX_POSITIONS,
        n_ctx=_MAX_POSITIONS,
        n_inner=2 * d,
        rotary_dim=4,
        tie_word_embeddings=False,
        **c,
    )


def _llama(c: dict[str, Any], d: int) -> PretrainedConfig:
    # CodeLlama / DeepSeek-Coder: untied, RMSNorm, grouped-query attention.
    return transformers.LlamaConfig(
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, **_llama_like(d), **c
    )


def _mistral(c: dict[str, Any], d: int) -> PretrainedConfig:
    return transformers.MistralConfig(
        num_key_value_heads=2, tie_word_embeddings=False, **_llama_like(d), **c
    )


def _qwen2(c: dict[str, Any], d: int) -> PretrainedConfig:
    # Qwen2.5-Coder <= 3B are tied (>= 7B untied): the tied variant here.
    return transformers.Qwen2Config(
        num_key_value_heads=2, tie_word_embeddings=True, **_llama_like(d), **c
    )


def _qwen3(c: dict[str, Any], d: int) -> PretrainedConfig:
    # Qwen3 has q/k norms inside attention and an explicit head_dim.
    return transformers.Qwen3Config(
        num_key_value_heads=2,
        head_dim=d // 4,
        tie_word_embeddings=False,
        **_llama_like(d),
        **c,
    )


def _starcoder2(c: dict[str, Any], d: int) -> PretrainedConfig:
    # StarCoder2: Llama-shaped module tree, but LayerNorm *with bias* everywhere.
    return transformers.Starcoder2Config(
        num_key_value_heads=2,
        norm_epsilon=1e-5,
        use_bias=True,
        tie_word_embeddings=True,
        **_llama_like(d),
        **c,
    )


def _gemma(c: dict[str, Any], d: int) -> PretrainedConfig:
    # CodeGemma: x * (1 + w) RMSNorm, embeddings scaled by sqrt(d), tied head.
    return transformers.GemmaConfig(
        num_key_value_heads=1, head_dim=d // 4, tie_word_embeddings=True, **_llama_like(d), **c
    )


def _gemma2(c: dict[str, Any], d: int) -> PretrainedConfig:
    # Gemma-2 caps logits at 30 in the real model; here 2.0, because the tiny model's logits are
    # O(1-5) and a cap of 30 would be the identity to within 1e-3 (a lens that forgot the cap would
    # pass the self-check). With 2.0 the cap changes the top logits by tens of percent.
    return transformers.Gemma2Config(
        num_key_value_heads=2,
        head_dim=d // 4,
        query_pre_attn_scalar=d // 4,
        final_logit_softcapping=2.0,
        tie_word_embeddings=True,
        **_llama_like(d),
        **c,
    )


def _phi3(c: dict[str, Any], d: int) -> PretrainedConfig:
    return transformers.Phi3Config(
        num_key_value_heads=4, tie_word_embeddings=False, **_llama_like(d), **c
    )


def _granite(c: dict[str, Any], d: int) -> PretrainedConfig:
    # Granite 3.x: logits / logits_scaling, embeddings * embedding_multiplier (applied before
    # block 0, so the layer-0 capture includes it), residual and attention multipliers.
    return transformers.GraniteConfig(
        num_key_value_heads=2,
        logits_scaling=4.0,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=1.0 / (d // 4),
        tie_word_embeddings=True,
        **_llama_like(d),
        **c,
    )


_CONFIG_BUILDERS: dict[str, Callable[[dict[str, Any], int], PretrainedConfig]] = {
    "gpt2": _gpt2,
    "gpt_bigcode": _gpt_bigcode,
    "gpt_neox": _gpt_neox,
    "codegen": _codegen,
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "starcoder2": _starcoder2,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "granite": _granite,
}
assert tuple(_CONFIG_BUILDERS) == TINY_FAMILIES


MODERN_FAMILIES: tuple[str, ...] = (
    "qwen3_moe",
    "qwen3_next",
    "deepseek_v2",
    "deepseek_v3",
    "glm4",
    "glm4_moe",
    "gemma3_text",
    "olmo2",
    "olmo3",
    "cohere",
    "cohere2",
    "seed_oss",
    "ministral3",
    "exaone4",
    "granitemoe",
    "granitemoehybrid",
    "gpt_oss",
    "smollm3",
    "llama4_text",
)
"""The code-model families of 2025-26 without a model-surgery entry (the general rule reads
them), built by :func:`generic_tiny_config` from their HF config class with tiny sizes."""

MULTIMODAL_FAMILIES: tuple[str, ...] = ("gemma3", "mistral3")
"""Checkpoints with a vision tower whose text tower the lens reads (``Gemma3ForConditional
Generation``, ``Mistral3ForConditionalGeneration``): a tiny text config as in
``MODERN_FAMILIES`` plus a one-layer vision tower."""

_TEXT_TOWERS = {"gemma3": "gemma3_text", "mistral3": "ministral3"}
"""The text model type inside each multimodal family (Mistral 3 checkpoints: Ministral 3)."""


def _mistral3(text: PretrainedConfig, vocab_size: int) -> PretrainedConfig:
    vision = transformers.PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=28,
        patch_size=14,
    )
    return transformers.Mistral3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=vocab_size - 1
    )


def _gemma3(text: PretrainedConfig, vocab_size: int) -> PretrainedConfig:
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    # Gemma3ForConditionalGeneration's forward applies no soft-cap (real Gemma 3 checkpoints set
    # none): the tiny text config's cap would make the self-check refuse the model, rightly.
    text.final_logit_softcapping = None
    # The image tokens are the last ids of the vocabulary: text never produces them.
    return transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=vocab_size - 3,
        eoi_token_index=vocab_size - 2,
        image_token_index=vocab_size - 1,
    )


_GENERIC_SIZES: dict[str, Any] = {
    # attention
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": _MAX_POSITIONS,
    "sliding_window": 64,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention (DeepSeek)
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # linear attention (Qwen3-Next) and Mamba (Granite 4 hybrid)
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_n_groups": 1,
    "mamba_d_conv": 4,
    "mamba_chunk_size": 16,
    # GPT-2-style and encoder-decoder names of the same sizes
    "n_layer": 2,
    "n_head": 4,
    "n_positions": _MAX_POSITIONS,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
}
"""Size fields of HF config classes, set to tiny values where a config class has them."""

_GENERIC_PER_FAMILY: dict[str, Callable[[int], dict[str, Any]]] = {
    # Multi-head latent attention has as many key/value heads as query heads, and its rotary
    # part sets the head size.
    "deepseek_v2": lambda d: {"num_key_value_heads": 4, "head_dim": 8},
    "deepseek_v3": lambda d: {"num_key_value_heads": 4, "head_dim": 8},
    # Mamba heads span the expanded width: n_heads * d_head = 2 * d; one Mamba, one attention layer.
    "granitemoehybrid": lambda d: {"mamba_d_head": d // 2, "layer_types": ["mamba", "attention"]},
    # Post-processing the lens must reproduce, at values that change the tiny model's logits
    # (see _gemma2 on the cap): Cohere multiplies by logit_scale (0.0625 by default), Granite
    # divides by logits_scaling, Gemma 3 may cap.
    "granitemoe": lambda d: {"logits_scaling": 4.0},
    "gemma3_text": lambda d: {"final_logit_softcapping": 2.0, "query_pre_attn_scalar": d // 4},
}


def generic_tiny_config(
    model_type: str,
    *,
    vocab_size: int,
    n_layers: int = 2,
    d_model: int = 64,
    special_token_ids: dict[str, int] | None = None,
) -> PretrainedConfig:
    """A tiny config of any HF ``model_type``: its config class with the size fields it has set
    to tiny values (``_GENERIC_SIZES``, plus what one family needs: ``_GENERIC_PER_FAMILY``).

    Raises:
        KeyError: transformers has no config class for ``model_type``.
        Exception: whatever the config class raises for sizes it cannot take.
    """
    cls = transformers.CONFIG_MAPPING[model_type]
    known = set(inspect.signature(cls.__init__).parameters)
    try:
        known |= set(cls().to_dict())
    except Exception:  # noqa: BLE001 - some defaults cannot be built: the signature must do
        pass
    sizes = {
        "vocab_size": vocab_size,
        "num_hidden_layers": n_layers,
        "hidden_size": d_model,
        "intermediate_size": 2 * d_model,
        "moe_intermediate_size": d_model,
        "shared_expert_intermediate_size": d_model,
        "head_dim": d_model // 4,
        "n_embd": d_model,
        "n_inner": 2 * d_model,
        "d_model": d_model,
        "ffn_dim": 2 * d_model,
        "decoder_ffn_dim": 2 * d_model,
        "encoder_ffn_dim": 2 * d_model,
        "initializer_range": INIT_STD,
        **_GENERIC_SIZES,
        **_GENERIC_PER_FAMILY.get(model_type, lambda d: {})(d_model),
    }
    chosen = {k: v for k, v in sizes.items() if k in known}
    return cls(**chosen, **(special_token_ids or {}))


def tiny_config(
    family: str,
    *,
    vocab_size: int,
    n_layers: int = 2,
    d_model: int = 32,
    special_token_ids: dict[str, int] | None = None,
    **config_overrides: Any,
) -> PretrainedConfig:
    """The HF config of a tiny ``family`` model (no weights, no tokenizer).

    Args:
        family: one of ``TINY_FAMILIES`` or ``MODERN_FAMILIES`` (built by
            ``generic_tiny_config``, at least 64 wide).
        vocab_size: unembedding rows V.
        n_layers: decoder blocks L.
        d_model: residual width d (a multiple of 4: 4 attention heads).
        special_token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (must be < V).
        **config_overrides: set on the config after construction (e.g. ``tie_word_embeddings``).

    Raises:
        ValueError: unknown family, or a ``d_model`` that the attention heads cannot split.
    """
    if family in MODERN_FAMILIES or family in MULTIMODAL_FAMILIES:
        config = generic_tiny_config(
            _TEXT_TOWERS.get(family, family),
            vocab_size=vocab_size,
            n_layers=n_layers,
            d_model=max(d_model, 64),  # latent attention and Mamba heads need the room
            special_token_ids=special_token_ids,
        )
        if family in MULTIMODAL_FAMILIES:
            config = {"gemma3": _gemma3, "mistral3": _mistral3}[family](config, vocab_size)
    elif family in _CONFIG_BUILDERS:
        if d_model % 16:
            # 4 heads of d/4, and rotary / CodeGen's 4-way qkv split need an even head size.
            raise ValueError(f"d_model must be a multiple of 16, got {d_model}")
        common = _common(vocab_size, n_layers, d_model, dict(special_token_ids or {}))
        config = _CONFIG_BUILDERS[family](common, d_model)
    else:
        raise ValueError(
            f"unknown tiny-model family {family!r}; choose one of "
            f"{TINY_FAMILIES + MODERN_FAMILIES + MULTIMODAL_FAMILIES}"
        )
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return config


def random_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """The fp32 model of ``config`` with HF's random init (seeded), every 1-D parameter (norm
    weights and biases) perturbed by ``PERTURB_STD`` so none is all ones or zeros, in eval mode."""
    # Model construction runs HF's _init_weights from the global RNG: seed it right before.
    torch.manual_seed(seed)
    model = auto_model_class(config).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():  # shared (tied) parameters are yielded once
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * PERTURB_STD)
    return model.eval()


def build_tiny_model(
    out_dir: Path,
    family: str = "llama",
    *,
    vocab_size: int | None = None,
    n_layers: int = 2,
    d_model: int = 32,
    seed: int = 0,
    tokenizer_texts: Iterable[str] | None = None,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random ``family`` model with a trained tokenizer and save it to ``out_dir``.

    Args:
        out_dir: directory to write (created; existing files of the same names are replaced).
        family: one of ``TINY_FAMILIES`` (equal to the HF ``model_type``).
        vocab_size: unembedding rows; default: the tokenizer's size rounded up to a multiple of
            ``VOCAB_MULTIPLE``, so padded rows beyond the tokenizer exist. Must be at least the
            tokenizer's size.
        n_layers: number of decoder blocks L.
        d_model: residual width d (multiple of 16).
        seed: ``torch.manual_seed`` for the random init (same seed -> same weights).
        tokenizer_texts: texts to train the BPE on; a few standard-library files if None.
        **config_overrides: set on the HF config (e.g. ``tie_word_embeddings=False``,
            ``final_logit_softcapping=None``).

    Returns:
        ``out_dir``, holding ``config.json``, ``model.safetensors`` and the tokenizer files.

    Raises:
        ValueError: unknown family, bad ``d_model``, or ``vocab_size`` smaller than the tokenizer.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(tokenizer_texts)
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = math.ceil(n_tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if vocab_size < n_tokens:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer ({n_tokens} tokens)"
        )
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = tiny_config(
        family,
        vocab_size=vocab_size,
        n_layers=n_layers,
        d_model=d_model,
        special_token_ids=special,
        **config_overrides,
    )
    model = random_model(config, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Safetensors is the default format of save_pretrained (the only one in transformers 5).
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
