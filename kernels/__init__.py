"""Lens statistics over the vocabulary without materialising ``[rows, V]`` logits.

``lens_stats`` dispatches between the vocab-chunked torch path (any device) and the two Triton
strategies (CUDA): the fused kernel and the chunked GEMM + fold; ``lens_stats_naive`` is the
float64 oracle all of them are tested against. Importing this
package never imports Triton or touches CUDA.
"""

from codelens.kernels.dispatch import LensImpl, lens_stats, resolve_impl, triton_strategy
from codelens.kernels.head import FinalNorm, Head, NormKind
from codelens.kernels.lens_torch import lens_stats_torch
from codelens.kernels.naive import lens_stats_from_logits, lens_stats_naive
from codelens.kernels.stats import LensRequest, LensStats

__all__ = [
    "FinalNorm",
    "Head",
    "LensImpl",
    "LensRequest",
    "LensStats",
    "NormKind",
    "lens_stats",
    "lens_stats_from_logits",
    "lens_stats_naive",
    "lens_stats_torch",
    "resolve_impl",
    "triton_strategy",
]
