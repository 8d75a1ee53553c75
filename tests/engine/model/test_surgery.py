"""Model surgery: every supported family yields the right blocks and Head, read from the model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from torch import nn

from codelens.engine.errors import SelfCheckError, UnsupportedArchitectureError
from codelens.engine.model.capture import ResidualCapture
from codelens.engine.model.loading import probe_batch, run_self_check
from codelens.engine.model.surgery import SUPPORTED, ModelParts, discover_family, model_parts
from codelens.engine.zoo.tiny_models import TINY_FAMILIES, tiny_config
from codelens.kernels.head import NormKind

LAYER, RMS = NormKind.LAYER, NormKind.RMS


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the Head of a tiny model of one family must look like (independent of SUPPORTED)."""

    kind: NormKind
    eps_key: str  # the config field the final norm's eps comes from
    norm_bias: bool = False
    weight_offset: float = 0.0
    unembed_bias: bool = False
    softcap: float | None = None
    logit_scale: float = 1.0
    tied: bool = False


EXPECTED: dict[str, Expected] = {
    "gpt2": Expected(LAYER, "layer_norm_epsilon", norm_bias=True, tied=True),
    "gpt_bigcode": Expected(LAYER, "layer_norm_epsilon", norm_bias=True, tied=True),
    "gpt_neox": Expected(LAYER, "layer_norm_eps", norm_bias=True),
    "codegen": Expected(LAYER, "layer_norm_epsilon", norm_bias=True, unembed_bias=True),
    "llama": Expected(RMS, "rms_norm_eps"),
    "mistral": Expected(RMS, "rms_norm_eps"),
    "qwen2": Expected(RMS, "rms_norm_eps", tied=True),
    "qwen3": Expected(RMS, "rms_norm_eps"),
    "starcoder2": Expected(LAYER, "norm_epsilon", norm_bias=True, tied=True),
    "gemma": Expected(RMS, "rms_norm_eps", weight_offset=1.0, tied=True),
    "gemma2": Expected(RMS, "rms_norm_eps", weight_offset=1.0, softcap=2.0, tied=True),
    "phi3": Expected(RMS, "rms_norm_eps"),
    "granite": Expected(RMS, "rms_norm_eps", logit_scale=0.25, tied=True),
}


def test_tables_cover_the_same_families() -> None:
    assert sorted(EXPECTED) == sorted(TINY_FAMILIES)
    assert sorted(spec.family for spec in SUPPORTED.values()) == sorted(TINY_FAMILIES)


def test_head_fields_per_family(tiny_family: str, tiny_loaded_model) -> None:
    loaded = tiny_loaded_model(tiny_family)
    model, parts, want = loaded.model, loaded.parts, EXPECTED[tiny_family]
    head = parts.head
    assert parts.family == tiny_family == model.config.model_type
    assert head.norm.kind is want.kind
    assert head.norm.eps == pytest.approx(getattr(model.config, want.eps_key))
    assert (head.norm.bias is not None) == want.norm_bias
    assert head.norm.weight is not None
    assert head.norm.weight_offset == want.weight_offset
    assert (head.unembed_bias is not None) == want.unembed_bias
    assert head.softcap == want.softcap
    assert head.logit_scale == want.logit_scale
    assert parts.tied_embeddings == want.tied
    # Padded vocabulary rows exist beyond the tokenizer, as in CodeLlama / Qwen2.5-Coder.
    assert head.vocab_size == model.config.vocab_size > len(loaded.tokenizer)


def test_head_shares_storage_with_the_model(tiny_family: str, tiny_loaded_model) -> None:
    loaded = tiny_loaded_model(tiny_family)
    model, head = loaded.model, loaded.parts.head
    out = model.get_output_embeddings()
    assert head.unembed.data_ptr() == out.weight.data_ptr()
    if head.unembed_bias is not None:
        assert head.unembed_bias.data_ptr() == out.bias.data_ptr()
    norm_params = {p.data_ptr() for p in model.parameters() if p.dim() == 1}
    assert head.norm.weight.data_ptr() in norm_params
    tied = head.unembed.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == EXPECTED[tiny_family].tied


def test_blocks_are_the_decoder_layers_in_order(tiny_family: str, tiny_loaded_model) -> None:
    loaded = tiny_loaded_model(tiny_family)
    parts = loaded.parts
    assert parts.n_layers == loaded.model.config.num_hidden_layers == 2
    module_list = next(
        m
        for m in loaded.model.modules()
        if isinstance(m, nn.ModuleList) and m[0] is parts.blocks[0]
    )
    assert list(parts.blocks) == list(module_list)


def test_head_reproduces_model_logits_on_unpadded_input(
    tiny_family: str, tiny_loaded_model
) -> None:
    loaded = tiny_loaded_model(tiny_family)
    model, parts = loaded.model, loaded.parts
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(loaded.tokenizer), (3, 11), generator=generator)
    capture = ResidualCapture(parts.blocks, [parts.n_layers])
    with torch.inference_mode():
        with capture.recording(3, 11, parts.head.d_model, torch.float32, "cpu") as buffer:
            logits = model(input_ids=ids).logits
        lens = parts.head.logits(buffer[0].view(3, 11, -1))
    torch.testing.assert_close(lens, logits.float(), atol=1e-5, rtol=1e-5)


def _ablations(parts: ModelParts) -> dict[str, ModelParts]:
    """Each head feature the family uses, switched off (or the norm kind swapped)."""
    head, norm = parts.head, parts.head.norm
    variants = {
        "norm weight dropped": dataclasses.replace(norm, weight=None),
        "norm kind swapped": dataclasses.replace(
            norm, kind=NormKind.RMS if norm.kind is NormKind.LAYER else NormKind.LAYER
        ),
    }
    if norm.bias is not None:
        variants["norm bias dropped"] = dataclasses.replace(norm, bias=None)
    if norm.weight_offset:
        variants["weight offset dropped"] = dataclasses.replace(norm, weight_offset=0.0)
    heads = {name: dataclasses.replace(head, norm=n) for name, n in variants.items()}
    if head.unembed_bias is not None:
        heads["unembed bias dropped"] = dataclasses.replace(head, unembed_bias=None)
    if head.softcap is not None:
        heads["softcap dropped"] = dataclasses.replace(head, softcap=None)
    if head.logit_scale != 1.0:
        heads["logit scale dropped"] = dataclasses.replace(head, logit_scale=1.0)
    return {name: dataclasses.replace(parts, head=h) for name, h in heads.items()}


def test_every_head_feature_is_needed(tiny_family: str, tiny_loaded_model) -> None:
    """The tiny models are discriminative: a head missing any of its features fails the check."""
    loaded = tiny_loaded_model(tiny_family)
    ids, mask = probe_batch(loaded.tokenizer, loaded.parts.head.vocab_size)
    assert run_self_check(loaded.model, loaded.parts, ids, mask) <= 1e-4
    for name, broken in _ablations(loaded.parts).items():
        with pytest.raises(SelfCheckError, match=tiny_family) as info:
            run_self_check(loaded.model, broken, ids, mask)
        assert "engine/model/surgery.py" in str(info.value), name


@pytest.mark.parametrize(
    ("family", "factor"),
    [("llama", 1.0), ("gemma", math.sqrt(32)), ("gemma2", math.sqrt(32)), ("granite", 12.0)],
)
def test_layer_zero_includes_embedding_scaling(
    family: str, factor: float, tiny_loaded_model
) -> None:
    """Layer 0 is the input of block 0: Gemma's sqrt(d) and Granite's multiplier are applied."""
    loaded = tiny_loaded_model(family)
    parts = loaded.parts
    ids = torch.tensor([[5, 17, 42, 99]])
    capture = ResidualCapture(parts.blocks, [0])
    with torch.inference_mode():
        with capture.recording(1, 4, parts.head.d_model, torch.float32, "cpu") as buffer:
            loaded.model(input_ids=ids)
    expected = loaded.model.get_input_embeddings().weight[ids[0]] * factor
    torch.testing.assert_close(buffer[0], expected, atol=1e-5, rtol=1e-5)


def test_tie_override_changes_sharing(tiny_model_dir) -> None:
    """Config overrides make tied/untied variants of any family; surgery follows the model."""
    from codelens.engine.model.loading import load_model

    untied_qwen2 = load_model(tiny_model_dir("qwen2", tie_word_embeddings=False), device="cpu")
    tied_llama = load_model(tiny_model_dir("llama", tie_word_embeddings=True), device="cpu")
    assert not untied_qwen2.parts.tied_embeddings
    assert tied_llama.parts.tied_embeddings
    assert (
        tied_llama.parts.head.unembed.data_ptr()
        == tied_llama.model.get_input_embeddings().weight.data_ptr()
    )


def test_gemma2_without_softcap_in_config(tiny_model_dir) -> None:
    from codelens.engine.model.loading import load_model

    loaded = load_model(tiny_model_dir("gemma2", final_logit_softcapping=None), device="cpu")
    assert loaded.parts.head.softcap is None


def _in_memory(family: str) -> nn.Module:
    config = tiny_config(family, vocab_size=64)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_a_model_off_the_common_layout_is_refused_with_the_reason() -> None:
    """BERT (its blocks in ``encoder.layer``) has no final norm: neither the table nor the
    general rule describes it, and the error says which part of the layout is missing."""
    model = transformers.BertLMHeadModel(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedArchitectureError) as info:
        model_parts(model)
    message = str(info.value)
    assert message.startswith("BertLMHeadModel: its base model has no single final norm module")
    assert "general rule" in message
    assert "add an entry to SUPPORTED in engine/model/surgery.py" in message


def test_a_family_without_an_entry_is_read_by_the_general_rule() -> None:
    """GPT-Neo has no table entry: the rule finds transformer.h, transformer.ln_f (measured to
    be a LayerNorm) and the tied head, and says so."""
    config = transformers.GPTNeoConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPTNeoForCausalLM(config)
    parts = model_parts(model)
    assert (parts.family, parts.head_source) == ("gpt_neo", "rule")
    assert parts.blocks == list(model.transformer.h)
    assert (
        parts.head.norm.kind is NormKind.LAYER and parts.head.norm.eps == model.transformer.ln_f.eps
    )
    assert parts.head.unembed.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert parts.backbone is model.transformer


@pytest.mark.parametrize(
    ("norm", "kind", "offset"),
    [
        ("layernorm", "layernorm", 0.0),
        ("rms", "rmsnorm", 0.0),
        ("rms_one_plus", "rmsnorm", 1.0),
    ],
)
def test_the_rule_measures_what_the_final_norm_computes(norm, kind, offset) -> None:
    """The final norm's kind comes from running it, not from its class name: a Llama whose final
    norm is swapped for another module computing LayerNorm or (1 + w) RMSNorm is read as such."""

    class RenamedNorm(nn.Module):  # a class the table does not know: only the rule reads it
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(d) + 0.5)
            self.bias = nn.Parameter(torch.randn(d)) if norm == "layernorm" else None
            self.eps = 1e-5

        def forward(self, x):
            if norm == "layernorm":
                return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return x * (self.weight + (1.0 if norm == "rms_one_plus" else 0.0))

    model = _in_memory("llama")
    model.model.norm = RenamedNorm(model.config.hidden_size)
    spec = discover_family(model)
    assert (spec.norm_kind.value, spec.weight_offset, spec.source) == (kind, offset, "rule")
    assert spec.final_norm == "model.norm" and spec.blocks == "model.layers"


def test_a_final_norm_of_no_known_kind_is_refused() -> None:
    class TanhNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = 1e-5

        def forward(self, x):
            return torch.tanh(x) * self.weight

    model = _in_memory("llama")
    model.model.norm = TanhNorm(model.config.hidden_size)
    with pytest.raises(UnsupportedArchitectureError, match="computes none of LayerNorm and"):
        discover_family(model)


def test_eps_is_read_from_the_module() -> None:
    model = _in_memory("llama")
    model.model.norm.variance_epsilon = 0.5
    assert model_parts(model).head.norm.eps == 0.5


def test_changed_norm_type_fails_loudly() -> None:
    llama = _in_memory("llama")
    llama.model.norm = nn.LayerNorm(32)
    with pytest.raises(UnsupportedArchitectureError, match="LayerNorm.*expected LlamaRMSNorm"):
        model_parts(llama)

    gpt2 = _in_memory("gpt2")
    gpt2.transformer.ln_f = type(_in_memory("llama").model.norm)(32)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaRMSNorm, expected LayerNorm"):
        model_parts(gpt2)


def test_moved_or_mismatched_blocks_fail_loudly() -> None:
    moved = _in_memory("mistral")
    del moved.model.layers
    with pytest.raises(UnsupportedArchitectureError, match="no decoder blocks at 'model.layers'"):
        model_parts(moved)

    short = _in_memory("qwen3")
    short.config.num_hidden_layers = 3
    with pytest.raises(
        UnsupportedArchitectureError, match="2 blocks but config.num_hidden_layers is 3"
    ):
        model_parts(short)
