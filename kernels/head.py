"""The model's read-out path, as plain tensors: final norm, unembedding and logit post-processing.

A logit lens reads every layer's residual stream ``h`` through the model's own head::

    z = post(norm(h) @ W_U^T + b_U)

``Head`` holds exactly what that needs and nothing model-specific: the model-surgery module of the
engine builds one per architecture, and every lens implementation (the float64 oracle, the
vocab-chunked torch path, the Triton kernel) consumes it.

Numerics: the norm is always computed in fp32 from the input (and in float64 by the oracle),
whatever the model's dtype. For fp32 models this reproduces the model's own op order to rounding;
for bf16/fp16 models it is *more* accurate than the model's own head (which rounds the normalised
activations to bf16 before the weight multiply), so the lens at the last layer matches the model's
logits to within the model dtype's rounding, not bitwise.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor


class NormKind(str, enum.Enum):
    """Final-norm families found in decoder LMs."""

    LAYER = "layernorm"
    """``(x - mean) / sqrt(var + eps) * w + b`` (GPT-2, GPT-BigCode, GPT-NeoX, CodeGen,
    Starcoder2)."""
    RMS = "rmsnorm"
    """``x / sqrt(mean(x^2) + eps) * (offset + w)`` (Llama family; Gemma with offset 1)."""


@dataclass(frozen=True)
class FinalNorm:
    """Parameters of the model's final norm.

    Attributes:
        kind: LayerNorm or RMSNorm.
        weight: ``[d]`` scale, or None for a norm without one.
        bias: ``[d]`` shift (LayerNorm only), or None.
        eps: the model's own epsilon, added to the variance / mean square.
        weight_offset: added to the weight before scaling; 1.0 for Gemma's ``x * (1 + w)``.
    """

    kind: NormKind
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    weight_offset: float = 0.0

    def apply(self, h: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Normalise rows of ``h [..., d]`` in ``dtype`` (fp32 by default, float64 for the
        oracle)."""
        x = h.to(dtype)
        if self.kind is NormKind.LAYER:
            x = x - x.mean(-1, keepdim=True)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * (self.weight.to(dtype) + self.weight_offset)
        if self.bias is not None:
            x = x + self.bias.to(dtype)
        return x


@dataclass(frozen=True)
class Head:
    """Everything between a residual-stream row and the model's logits.

    Attributes:
        norm: the final norm.
        unembed: ``W_U [V, d]`` (the output embedding; tied or not, it is the weight the model
            uses).
        unembed_bias: ``b_U [V]`` or None (CodeGen and Phi-2 heads have one).
        logit_scale: multiplies the logits after the bias (Granite: ``1 / logits_scaling``).
        softcap: if set, ``z -> softcap * tanh(z / softcap)`` after scaling (Gemma-2).
    """

    norm: FinalNorm
    unembed: Tensor
    unembed_bias: Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.unembed.dim() != 2:
            raise ValueError(f"unembed must be [V, d], got shape {tuple(self.unembed.shape)}")
        if self.unembed_bias is not None and self.unembed_bias.shape != (self.vocab_size,):
            raise ValueError(
                f"unembed_bias must be [{self.vocab_size}], got {tuple(self.unembed_bias.shape)}"
            )
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be positive, got {self.softcap}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(
                f"logit_scale must be a positive finite number, got {self.logit_scale}"
            )

    @property
    def vocab_size(self) -> int:
        """Number of unembedding rows V (may exceed the tokenizer's vocabulary: padded rows)."""
        return self.unembed.shape[0]

    @property
    def d_model(self) -> int:
        """Residual-stream width d."""
        return self.unembed.shape[1]

    def postprocess(self, z: Tensor, bias: Tensor | None = None) -> Tensor:
        """Apply bias, scale and soft-cap to raw ``x_hat @ W^T`` products (in z's dtype).

        Args:
            z: ``[..., n]`` raw products for ``n`` vocabulary entries.
            bias: ``[n]`` the matching slice of ``b_U`` (None for no bias).
        """
        if bias is not None:
            z = z + bias.to(z.dtype)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, h: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Full lens logits ``[..., V]`` of rows ``h [..., d]``. Materialises V: tests and probes
        only."""
        x = self.norm.apply(h, dtype)
        return self.postprocess(x @ self.unembed.to(dtype).T, self.unembed_bias)
