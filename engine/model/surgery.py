"""Find the parts of a HuggingFace causal LM that the logit lens needs.

All architecture knowledge of the project lives in this module, in one table: ``SUPPORTED`` maps a
HF model class name to a :class:`FamilySpec` that says where the decoder blocks and the final norm
are, which kind of norm it is, where its epsilon lives, and which config fields post-process the
logits. :func:`model_parts` reads every *value* (weights, biases, eps, soft-cap, logit scaling)
from the model's own modules and config; the table only says where to look.

Anything the table does not describe fails loudly with :class:`UnsupportedArchitectureError`:
an unknown class, a block list or norm module missing from its path, a norm module of another type
than expected (a transformers release that reorganised a model), a block count that disagrees with
the config. A layout that silently changed its meaning is caught later, at load time, by the
self-check in :mod:`codelens.engine.model.loading` (the lens at layer L must reproduce the model's
logits).

Families without an entry go through one general rule, :func:`discover_family`: a
``*ForCausalLM`` with the common layout (a base model holding one ``ModuleList`` of
``num_hidden_layers`` blocks and one final norm module, ``get_output_embeddings()``, post-processing
named in the config) gets a ``FamilySpec`` built from what the model itself shows, the final
norm's kind included: it is *measured*, by running the module on a probe and matching LayerNorm,
RMSNorm and Gemma's ``(1 + w)`` RMSNorm. Nothing found by the rule is trusted before the load-time
self-check proves lens(L) == logits; a model the rule cannot describe is refused with the reason.

Adding a family with quirks: add a ``SUPPORTED`` entry (read the family's ``modeling_*.py``: the
final-norm module and its forward, and everything ``*ForCausalLM.forward`` does to the logits after
``lm_head``), add a config builder in :mod:`codelens.engine.zoo.tiny_models`, and the parametrised
tests cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codelens.engine.errors import UnsupportedArchitectureError
from codelens.kernels.head import FinalNorm, Head, NormKind


@dataclass(frozen=True)
class FamilySpec:
    """Where one architecture keeps what the lens needs, and how to read it.

    Attributes:
        family: short name (the HF ``model_type``), recorded in run metadata.
        blocks: dotted path from the ``*ForCausalLM`` module to the ``ModuleList`` of decoder
            blocks.
        final_norm: dotted path to the final norm module (applied after the last block).
        norm_kind: LayerNorm or RMSNorm.
        norm_classes: accepted class names of the final-norm module. For ``NormKind.LAYER`` the
            module must also be an ``nn.LayerNorm``.
        eps_attr: the norm module's attribute holding epsilon (``eps``, ``variance_epsilon``).
        weight_offset: added to the norm weight in the module's forward (Gemma: ``x * (1 + w)``).
        softcap_attr: config field of a final-logit soft-cap ``c * tanh(z / c)``, if the
            family's forward applies one (its value may still be None: no cap).
        logits_divisor_attr: config field the forward divides the logits by (Granite's
            ``logits_scaling``), if any.
        logits_multiplier_attr: config field the forward multiplies the logits by (Cohere's
            ``logit_scale``), if any.
        attn_residual: name, inside each block, of the module whose *input* is the residual
            stream right after the attention sublayer (``h_{l-1} + attn_l(...)``, including any
            post-attention norm or residual multiplier the block applies before the add): the
            pre-MLP norm. ``lens.sites: [attn]`` captures it with a forward pre-hook. None: the
            family has no such point (see ``parallel_reason``).
        parallel_attr: config flag that, when true, makes attention and MLP run in parallel off
            the same input (GPT-NeoX's ``use_parallel_residual``): no post-attention point then.
        parallel_reason: why the family (or the flagged config) has no post-attention residual.
    """

    family: str
    blocks: str
    final_norm: str
    norm_kind: NormKind
    norm_classes: tuple[str, ...]
    eps_attr: str
    weight_offset: float = 0.0
    softcap_attr: str | None = None
    logits_divisor_attr: str | None = None
    logits_multiplier_attr: str | None = None
    attn_residual: str | None = None
    parallel_attr: str | None = None
    parallel_reason: str | None = None
    source: str = "table"
    """'table' (an entry of ``SUPPORTED``) or 'rule' (found by ``discover_family``)."""


def _layernorm(
    family: str,
    blocks: str,
    final_norm: str,
    attn_residual: str | None,
    *,
    parallel_attr: str | None = None,
    parallel_reason: str | None = None,
) -> FamilySpec:
    return FamilySpec(
        family,
        blocks=blocks,
        final_norm=final_norm,
        norm_kind=NormKind.LAYER,
        norm_classes=("LayerNorm",),
        eps_attr="eps",
        attn_residual=attn_residual,
        parallel_attr=parallel_attr,
        parallel_reason=parallel_reason,
    )


def _rmsnorm(
    family: str,
    norm_class: str,
    *,
    eps_attr: str = "variance_epsilon",
    weight_offset: float = 0.0,
    softcap_attr: str | None = None,
    logits_divisor_attr: str | None = None,
    attn_residual: str = "post_attention_layernorm",
) -> FamilySpec:
    # Every Llama-derived family keeps its blocks in model.layers and its norm in model.norm.
    return FamilySpec(
        family,
        blocks="model.layers",
        final_norm="model.norm",
        norm_kind=NormKind.RMS,
        norm_classes=(norm_class,),
        eps_attr=eps_attr,
        weight_offset=weight_offset,
        softcap_attr=softcap_attr,
        logits_divisor_attr=logits_divisor_attr,
        attn_residual=attn_residual,
    )


_PARALLEL = "its attention and MLP run in parallel off the same block input"

SUPPORTED: dict[str, FamilySpec] = {
    # LayerNorm families: the final norm is a plain torch nn.LayerNorm (eps read from it; the
    # bias may be None for LayerNorm(bias=False) variants).
    # The post-attention residual (lens.sites: attn) is the input of the pre-MLP norm: ln_2 in
    # GPT-2/BigCode, post_attention_layernorm in GPT-NeoX (sequential residual only) and the
    # Llama-shaped families, pre_feedforward_layernorm in Gemma-2 (whose post_attention_layernorm
    # is applied to the attention output before the add, so it is included).
    "GPT2LMHeadModel": _layernorm("gpt2", "transformer.h", "transformer.ln_f", "ln_2"),
    "GPTBigCodeForCausalLM": _layernorm("gpt_bigcode", "transformer.h", "transformer.ln_f", "ln_2"),
    "GPTNeoXForCausalLM": _layernorm(
        "gpt_neox",
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        "post_attention_layernorm",
        parallel_attr="use_parallel_residual",
        parallel_reason=f"use_parallel_residual=True: {_PARALLEL}",
    ),
    # CodeGen's lm_head carries a bias; it is read from the output embedding, not declared here.
    "CodeGenForCausalLM": _layernorm(
        "codegen", "transformer.h", "transformer.ln_f", None, parallel_reason=_PARALLEL
    ),
    # StarCoder2 is Llama-shaped (model.layers, model.norm) but its norm is nn.LayerNorm with bias.
    "Starcoder2ForCausalLM": _layernorm(
        "starcoder2", "model.layers", "model.norm", "post_attention_layernorm"
    ),
    # RMSNorm families: weight * (x / rms(x)), eps in `variance_epsilon`.
    "LlamaForCausalLM": _rmsnorm("llama", "LlamaRMSNorm"),
    "MistralForCausalLM": _rmsnorm("mistral", "MistralRMSNorm"),
    "Qwen2ForCausalLM": _rmsnorm("qwen2", "Qwen2RMSNorm"),
    "Qwen3ForCausalLM": _rmsnorm("qwen3", "Qwen3RMSNorm"),
    "Phi3ForCausalLM": _rmsnorm("phi3", "Phi3RMSNorm"),
    # Granite 3.x: forward returns lm_head(h) / config.logits_scaling. (Its embedding_multiplier
    # is applied before block 0, so the layer-0 capture includes it.)
    "GraniteForCausalLM": _rmsnorm(
        "granite", "GraniteRMSNorm", logits_divisor_attr="logits_scaling"
    ),
    # Gemma: (x / rms(x)) * (1 + w) computed in fp32, eps in `eps`. The sqrt(d) embedding scale is
    # inside the embedding module, so the layer-0 capture (input of block 0) includes it.
    "GemmaForCausalLM": _rmsnorm("gemma", "GemmaRMSNorm", eps_attr="eps", weight_offset=1.0),
    # Gemma-2: same norm, plus the final-logit soft-cap when the config sets one (may be None).
    "Gemma2ForCausalLM": _rmsnorm(
        "gemma2",
        "Gemma2RMSNorm",
        eps_attr="eps",
        weight_offset=1.0,
        softcap_attr="final_logit_softcapping",
        attn_residual="pre_feedforward_layernorm",
    ),
}
"""HF ``*ForCausalLM`` class name -> where its lens parts are. The only architecture table."""

_ADD_ENTRY_HINT = "add an entry to SUPPORTED in engine/model/surgery.py"


@dataclass(frozen=True)
class ModelParts:
    """The pieces of a model the lens runner uses.

    Attributes:
        family: the ``FamilySpec.family`` of the model (e.g. ``"llama"``, ``"gemma2"``).
        blocks: the ``L`` decoder blocks in order (hook targets for ``ResidualCapture``).
        head: final norm, ``W_U [V, d]``, ``b_U [V]`` and logit post-processing, as tensors that
            share storage with the model's parameters (no copies).
        tied_embeddings: whether ``W_U`` is the input embedding matrix (the layer-0 lens then
            mostly reads back the current token).
        backbone: the model without its LM head (HF's ``base_model``: embeddings, blocks, final
            norm). The runner calls it instead of the whole model, so the model's own
            ``[tokens, V]`` logits, which the lens does not read, are never computed; None when
            the model has no separate backbone (then the whole model runs).
        head_source: 'table' or 'rule' (``FamilySpec.source``), recorded in job.json.
    """

    family: str
    blocks: Sequence[nn.Module]
    head: Head
    tied_embeddings: bool = False
    backbone: nn.Module | None = None
    head_source: str = "table"
    """Where the head's description came from: 'table' (``SUPPORTED``) or 'rule'."""

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks L; lens layers are ``0..L``."""
        return len(self.blocks)


def _unsupported(model: nn.Module, problem: str) -> UnsupportedArchitectureError:
    if type(model).__name__ not in SUPPORTED:
        return UnsupportedArchitectureError(
            f"{type(model).__name__}: {problem}. It has no entry in the model-surgery table and "
            "the general rule for the common *ForCausalLM layout cannot describe it, so the lens "
            f"cannot read it safely. To support this model, {_ADD_ENTRY_HINT}."
        )
    return UnsupportedArchitectureError(
        f"{type(model).__name__}: {problem}. To support this model, {_ADD_ENTRY_HINT}."
    )


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise _unsupported(
            model, f"no {what} at '{path}' (the layout differs from the SUPPORTED entry)"
        ) from None


def _final_norm(model: nn.Module, spec: FamilySpec, d_model: int) -> FinalNorm:
    """Read the final norm's parameters after checking the module is what the spec expects."""
    module = _submodule(model, spec.final_norm, "final norm")
    name = type(module).__name__
    table = spec.source == "table"  # a rule's spec comes from measuring this very module
    if name not in spec.norm_classes or (
        table and spec.norm_kind is NormKind.LAYER and not isinstance(module, nn.LayerNorm)
    ):
        raise _unsupported(
            model,
            f"the final norm '{spec.final_norm}' is a {name}, expected "
            f"{' or '.join(spec.norm_classes)} ({spec.norm_kind.value})",
        )
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = getattr(module, spec.eps_attr, None)
    if table and spec.norm_kind is NormKind.RMS and not isinstance(weight, Tensor):
        # Every supported RMSNorm has a learned scale; a missing one means a different module.
        raise _unsupported(model, f"the final norm {name} has no weight")
    if spec.norm_kind is NormKind.RMS and bias is not None:
        raise _unsupported(model, f"the final RMSNorm {name} unexpectedly has a bias")
    for label, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tuple(tensor.shape) != (d_model,):
            raise _unsupported(
                model,
                f"the final norm {label} has shape {tuple(tensor.shape)}, expected ({d_model},)",
            )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise _unsupported(model, f"the final norm {name} has no numeric '{spec.eps_attr}'")
    return FinalNorm(
        kind=spec.norm_kind,
        weight=None if weight is None else weight.detach(),
        bias=None if bias is None else bias.detach(),
        eps=float(eps),
        weight_offset=spec.weight_offset,
    )


def _text_config(model: nn.Module) -> object | None:
    """The config of the language model (the text tower's for a multimodal config)."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _config_value(model: nn.Module, attr: str) -> object:
    config = _text_config(model)
    if config is None or not hasattr(config, attr):
        raise _unsupported(model, f"its config has no '{attr}'")
    return getattr(config, attr)


def _positive_config_value(model: nn.Module, attr: str) -> float | None:
    """A post-processing constant from the config: a positive number, or None (not set)."""
    value = _config_value(model, attr)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _unsupported(model, f"config.{attr} is {value!r}, expected a positive number")
    return float(value)


# -- the general rule ----------------------------------------------------------------------------

FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")
"""Names of the final norm among a base model's children, when more than one child is a norm."""

EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
"""Attributes where norm modules keep their epsilon."""

SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap")
"""Config fields of a final-logit soft-cap ``c * tanh(z / c)``."""
DIVISOR_ATTRS = ("logits_scaling",)
"""Config fields the logits are divided by."""
MULTIPLIER_ATTRS = ("logit_scale",)
"""Config fields the logits are multiplied by."""

_NORM_CANDIDATES = (
    (NormKind.LAYER, 0.0),
    (NormKind.LAYER, 1.0),
    (NormKind.RMS, 0.0),
    (NormKind.RMS, 1.0),
)
"""What a final norm may compute: LayerNorm and RMSNorm, each with ``w`` or ``(1 + w)``
(Gemma's RMSNorm, Nemotron's LayerNorm1P)."""


def family_spec(model: nn.Module) -> FamilySpec:
    """The ``SUPPORTED`` entry of the model's class, or the general rule's description of it.

    Raises:
        UnsupportedArchitectureError: no entry, and the rule cannot describe the model (why).
    """
    spec = SUPPORTED.get(type(model).__name__)
    return spec if spec is not None else discover_family(model)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def discover_family(model: nn.Module) -> FamilySpec:
    """Describe a causal LM of the common layout from the model itself (the general rule).

    The model's ``base_model`` must hold exactly one ``ModuleList`` of ``num_hidden_layers``
    blocks and one final norm (a child whose class is a norm; by name among ``FINAL_NORM_NAMES``
    if several are). The norm's kind is measured (``measure_norm``); the logit post-processing is
    what the config names (``SOFTCAP_ATTRS``, ``DIVISOR_ATTRS``, ``MULTIPLIER_ATTRS``). The
    ``attn`` site is the input of the blocks' pre-MLP norm where the block layout shows one
    (``_attn_residual``). The load-time self-check then proves or refuses the description.

    Raises:
        UnsupportedArchitectureError: saying which part of the layout the model lacks.
    """
    prefix, base = _base_model(model)
    n_layers = _config_value(model, "num_hidden_layers")
    prefix, base = _language_model(model, prefix, base, n_layers)
    children = dict(base.named_children())
    lists = _block_lists(base, n_layers)
    if len(lists) != 1:
        found = "no" if not lists else f"{len(lists)} ({', '.join(lists)})"
        raise _unsupported(
            model,
            f"its base model has {found} ModuleList of config.num_hidden_layers = {n_layers} "
            "blocks, where the general rule needs exactly one",
        )
    blocks = lists[0]
    norms = [name for name, child in children.items() if _is_norm(child)]
    if len(norms) > 1:
        norms = [name for name in norms if name in FINAL_NORM_NAMES]
    if len(norms) != 1:
        raise _unsupported(
            model,
            "its base model has no single final norm module"
            + (f" (candidates: {', '.join(norms)})" if norms else ""),
        )
    norm_module = children[norms[0]]
    eps_attr = next((a for a in EPS_ATTRS if isinstance(getattr(norm_module, a, None), float)), "")
    if not eps_attr:
        raise _unsupported(
            model, f"its final norm {type(norm_module).__name__} has no epsilon ({EPS_ATTRS})"
        )
    kind, offset = measure_norm(model, norm_module, getattr(norm_module, eps_attr))
    config = _text_config(model)

    def named(attrs: tuple[str, ...]) -> str | None:
        return next((a for a in attrs if hasattr(config, a)), None)

    attn_residual, no_attn_reason = _attn_residual(base.get_submodule(blocks))
    return FamilySpec(
        family=str(getattr(model.config, "model_type", type(model).__name__)),
        blocks=f"{prefix}.{blocks}",
        final_norm=f"{prefix}.{norms[0]}",
        norm_kind=kind,
        norm_classes=(type(norm_module).__name__,),
        eps_attr=eps_attr,
        weight_offset=offset,
        softcap_attr=named(SOFTCAP_ATTRS),
        logits_divisor_attr=named(DIVISOR_ATTRS),
        logits_multiplier_attr=named(MULTIPLIER_ATTRS),
        attn_residual=attn_residual,
        parallel_reason=no_attn_reason,
        source="rule",
    )


def _base_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The base model's attribute name and module: HF's ``base_model`` when it is a proper part
    of the model, else the one child (besides the output embedding) that holds module lists
    (Llama 4's ``model``, whose ``base_model_prefix`` names another attribute)."""
    base = getattr(model, "base_model", None)
    for name, child in model.named_children():
        if child is base and base is not model:
            return name, child
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    holders = [
        (name, child)
        for name, child in model.named_children()
        if child is not head and any(isinstance(m, nn.ModuleList) for m in child.children())
    ]
    if len(holders) != 1:
        raise _unsupported(model, "it has no single base model module holding the blocks")
    return holders[0]


def _block_lists(module: nn.Module, n_layers: object) -> list[str]:
    """Names of ``module``'s children that are ``ModuleList``s of ``n_layers`` modules."""
    return [
        name
        for name, child in module.named_children()
        if isinstance(child, nn.ModuleList) and len(child) == n_layers
    ]


def _language_model(
    model: nn.Module, prefix: str, base: nn.Module, n_layers: object
) -> tuple[str, nn.Module]:
    """The module holding the blocks: ``base`` itself, or for a multimodal model (Gemma 3,
    Mistral 3, Llama 4 with their vision towers) the one child of ``base`` that does (its
    ``language_model``). The lens reads the text tower; the model runs on text only."""
    if _block_lists(base, n_layers):
        return prefix, base
    towers = [(n, c) for n, c in base.named_children() if _block_lists(c, n_layers)]
    if len(towers) == 1:
        return f"{prefix}.{towers[0][0]}", towers[0][1]
    return prefix, base  # discover_family names what is missing


def measure_norm(model: nn.Module, module: nn.Module, eps: float) -> tuple[NormKind, float]:
    """Which of LayerNorm, RMSNorm and ``(1 + w)`` RMSNorm ``module`` computes, by running it.

    A probe ``x [4, d]`` with non-zero mean (so LayerNorm and RMSNorm differ) goes through the
    module in its own dtype; each candidate ``FinalNorm`` (with the module's weight, bias and
    ``eps``) is computed in fp32 from the same input, and the one within the dtype's rounding is
    the norm's kind.

    Raises:
        UnsupportedArchitectureError: none of them (or more than one) matches.
    """
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    weight = weight.detach() if isinstance(weight, Tensor) else None
    bias = bias.detach() if isinstance(bias, Tensor) else None
    reference = weight if weight is not None else next(module.parameters(), None)
    d = _config_value(model, "hidden_size") if weight is None else weight.shape[-1]
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    if device.type == "meta":
        raise _unsupported(model, "its final norm has no weights loaded (meta device)")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(4, int(d), generator=gen) * 2 + 0.7).to(device=device, dtype=dtype)
    with torch.no_grad():
        y = module(x).float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    matches = []
    for kind, offset in _NORM_CANDIDATES:
        if (kind is NormKind.RMS and bias is not None) or (weight is None and offset):
            continue  # an RMSNorm has no shift; without a weight the offset means nothing
        candidate = FinalNorm(kind, weight, bias if kind is NormKind.LAYER else None, eps, offset)
        err = (candidate.apply(x) - y).abs().max().item() / max(1.0, y.abs().max().item())
        if err <= tolerance:
            matches.append((kind, offset))
    if len(matches) != 1:
        raise _unsupported(
            model,
            f"its final norm {type(module).__name__} computes "
            + ("none" if not matches else "more than one")
            + " of LayerNorm and RMSNorm (with w or 1 + w) on a probe",
        )
    return matches[0]


_PRE_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm")
"""Per block, the names of the norm that reads the residual stream right after attention."""


def _attn_residual(blocks: nn.Module) -> tuple[str | None, str | None]:
    """The blocks' module whose input is the post-attention residual, or None and why not.

    Pre-norm blocks (``input_layernorm`` before attention) read the post-attention residual with
    their pre-MLP norm: ``pre_feedforward_layernorm`` where the block has one (Gemma-style
    sandwich norms), else ``post_attention_layernorm``. Post-norm blocks (no ``input_layernorm``:
    the norms follow the sublayers, OLMo 2), parallel blocks (attention and MLP off one input,
    Cohere) and blocks without attention (Mamba or linear-attention layers) have no such module.
    """
    layers = list(blocks)

    def attends(block: nn.Module) -> bool:
        return any(isinstance(getattr(block, a, None), nn.Module) for a in ("self_attn", "attn"))

    if not all(attends(b) for b in layers):
        plain = [i for i, b in enumerate(layers) if not attends(b)]
        return None, (
            f"blocks {plain} have no self-attention (Mamba or linear-attention layers), so their "
            "residual stream has no post-attention point"
        )
    if not all(hasattr(b, "input_layernorm") for b in layers):
        if all(hasattr(b, "post_attention_layernorm") for b in layers):
            return None, (
                "its blocks are post-norm (the norms are applied to the attention and MLP outputs "
                "before each residual add): no module reads the post-attention residual as input"
            )
        return None, "its blocks show no norm before the MLP"
    for name in _PRE_MLP_NORMS:
        if all(isinstance(getattr(b, name, None), nn.Module) for b in layers):
            return name, None
    return None, f"{_PARALLEL} (the blocks have a single input_layernorm)"


def model_parts(model: nn.Module) -> ModelParts:
    """Locate the blocks and build the lens ``Head`` of a supported HF causal LM.

    Args:
        model: a ``*ForCausalLM`` (``PreTrainedModel``) whose class name is in ``SUPPORTED``.

    Returns:
        The model's ``ModelParts``. ``head.unembed`` is ``model.get_output_embeddings().weight``
        (``[V, d]``, tied or not) and ``head.unembed_bias`` its bias (``[V]``) if it has one; all
        head tensors are detached views of the model's parameters, so they follow
        ``model.to(...)`` only if ``model_parts`` is called again afterwards.

    Raises:
        UnsupportedArchitectureError: the class is not in ``SUPPORTED``, or the model's layout
            does not match its entry (missing module, unexpected norm type or shape, block count
            different from the config).
    """
    spec = family_spec(model)

    blocks = _submodule(model, spec.blocks, "decoder blocks")
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise _unsupported(model, f"'{spec.blocks}' is not a non-empty ModuleList of blocks")
    n_layers = _config_value(model, "num_hidden_layers")
    if n_layers != len(blocks):
        # Some forwards iterate layers[:num_hidden_layers]; hooks on unused blocks would never fire.
        raise _unsupported(
            model,
            f"'{spec.blocks}' holds {len(blocks)} blocks but config.num_hidden_layers is "
            f"{n_layers}",
        )

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    unembed = getattr(out, "weight", None)
    if not isinstance(unembed, Tensor) or unembed.dim() != 2:
        raise _unsupported(model, "get_output_embeddings() has no [V, d] weight")
    unembed_bias = getattr(out, "bias", None)

    # A soft-cap of None means "no cap" (the forward checks `is not None`); a None divisor would
    # make the forward itself fail, so it is an error here too.
    softcap = None
    if spec.softcap_attr is not None:
        softcap = _positive_config_value(model, spec.softcap_attr)
    logit_scale = 1.0
    if spec.logits_divisor_attr is not None:
        divisor = _positive_config_value(model, spec.logits_divisor_attr)
        if divisor is None:
            raise _unsupported(model, f"config.{spec.logits_divisor_attr} is None")
        logit_scale = 1.0 / divisor
    if spec.logits_multiplier_attr is not None:
        multiplier = _positive_config_value(model, spec.logits_multiplier_attr)
        if multiplier is not None:  # the forward multiplies only when it is set
            logit_scale *= multiplier

    head = Head(
        norm=_final_norm(model, spec, d_model=unembed.shape[1]),
        unembed=unembed.detach(),
        unembed_bias=None if unembed_bias is None else unembed_bias.detach(),
        logit_scale=logit_scale,
        softcap=softcap,
    )
    in_embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    in_weight = getattr(in_embed, "weight", None)
    tied = isinstance(in_weight, Tensor) and in_weight.data_ptr() == unembed.data_ptr()
    return ModelParts(
        family=spec.family,
        blocks=list(blocks),
        head=head,
        tied_embeddings=tied,
        backbone=_backbone(model, blocks, spec.blocks.rpartition(".")[0]),
        head_source=spec.source,
    )


def _backbone(model: nn.Module, blocks: Sequence[nn.Module], path: str) -> nn.Module | None:
    """The model without its LM head: HF's ``base_model`` when it is a proper part of the model
    (for a multimodal model it runs the text-only path of the full forward), else the module at
    ``path`` (the blocks' parent), if it holds every block."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        base = model.get_submodule(path) if path else model
    if base is model:
        return None
    inside = {id(m) for m in base.modules()}
    return base if all(id(b) in inside for b in blocks) else None


def attn_residual_modules(model: nn.Module) -> list[nn.Module]:
    """Per block, the module whose input is the residual stream right after attention.

    A forward pre-hook on ``result[l - 1]`` sees ``h_{l-1} + attn_l(...)`` (with the block's own
    post-attention norm and residual multiplier): the ``attn`` site of layer ``l``.

    Raises:
        UnsupportedArchitectureError: the family (or this config) runs attention and MLP in
            parallel, so there is no residual stream between them; or a block lacks the module.
    """
    spec = family_spec(model)
    parallel = spec.parallel_attr is not None and bool(
        getattr(getattr(model, "config", None), spec.parallel_attr, False)
    )
    if spec.attn_residual is None or parallel:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} ({spec.family}) has no residual stream between attention and "
            f"MLP: {spec.parallel_reason}. lens.sites: [attn] is not defined for it; use "
            "lens.sites: [block]"
        )
    blocks = _submodule(model, spec.blocks, "decoder blocks")
    out = []
    for i, block in enumerate(blocks):
        module = getattr(block, spec.attn_residual, None)
        if not isinstance(module, nn.Module):
            raise _unsupported(model, f"block {i} has no '{spec.attn_residual}' module")
        out.append(module)
    return out


def router_modules(model: nn.Module) -> tuple[list[nn.Module | None], int]:
    """Per block, the mixture-of-experts router (None for a dense block), and its top-k.

    A router is the one submodule of a block whose class name ends in ``Router`` and that has
    ``top_k``: the transformers 5 routers (``Qwen3MoeTopKRouter``, ``DeepseekV3TopkRouter``,
    ``GptOssTopKRouter``, ...) return ``(router_logits, weights, chosen expert ids [tokens, k])``;
    ``model.capture.RouterCapture`` checks that shape when it records.

    Raises:
        UnsupportedArchitectureError: no block has a router (a dense model), a block has more than
            one, or the routers disagree on ``top_k``.
    """
    spec = family_spec(model)
    blocks = _submodule(model, spec.blocks, "decoder blocks")
    routers: list[nn.Module | None] = []
    for i, block in enumerate(blocks):
        found = [
            m
            for m in block.modules()
            if type(m).__name__.endswith("Router") and isinstance(getattr(m, "top_k", None), int)
        ]
        if len(found) > 1:
            raise _unsupported(model, f"block {i} has {len(found)} router modules, not one")
        routers.append(found[0] if found else None)
    top_ks = {r.top_k for r in routers if r is not None}
    if not top_ks:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} ({spec.family}) has no mixture-of-experts router in its "
            "blocks (no *Router module with top_k): lens.router_topk needs an MoE model; set "
            "lens.router_topk: false"
        )
    if len(top_ks) > 1:
        raise _unsupported(model, f"its routers choose different numbers of experts: {top_ks}")
    return routers, top_ks.pop()
