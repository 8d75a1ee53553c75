"""Choose the lens implementation: ``auto | torch | triton | triton-fused | triton-chunked``.

Two Triton strategies compute the same contract: ``triton-fused`` (one kernel: GEMM tiles with the
statistics in the epilogue, ``lens_triton``) and ``triton-chunked`` (a vendor GEMM per row block
and vocabulary chunk into a reused buffer, then a fold kernel, ``lens_chunked``). ``triton`` is
the default strategy for the shape (``triton_strategy``); ``auto`` is that on a CUDA device and the
vocab-chunked torch path elsewhere. An explicit Triton choice never falls back: where Triton cannot
run it raises with the reason and the fix. On a CPU the kernels run only under
``TRITON_INTERPRET=1`` (slowly; for tests). Nothing here imports Triton or touches CUDA at import
time.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.metadata
import importlib.util
import os
import warnings

import torch
from torch import Tensor

from codelens.kernels.head import Head
from codelens.kernels.lens_torch import lens_stats_torch
from codelens.kernels.stats import LensRequest, LensStats


class LensImpl(str, enum.Enum):
    """Which lens implementation runs (``AUTO`` and ``TRITON`` resolve to one of the others)."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
    TRITON_FUSED = "triton-fused"
    TRITON_CHUNKED = "triton-chunked"

    @property
    def is_triton(self) -> bool:
        """Whether this is one of the Triton strategies (or the choice between them)."""
        return self in (LensImpl.TRITON, LensImpl.TRITON_FUSED, LensImpl.TRITON_CHUNKED)


FUSED_MAX_K = 64
"""The largest k the fused kernel keeps well: its top-k state lives in registers next to the
accumulator tile (k = 100 spills; k = 1024 needs ~10 GB of partials per launch), so a larger k
goes to the chunked strategy, whose top-k for such k runs in torch on each chunk."""

STRATEGY_BY_WIDTH: tuple[tuple[int, LensImpl], ...] = ((1 << 30, LensImpl.TRITON_CHUNKED),)
"""``(largest d_model, strategy)`` rows, first match wins: what ``triton`` means for k <=
``FUSED_MAX_K``. Predicted, not yet measured on a GPU (kernels/DESIGN.md, "Choosing the
strategy"): on i.i.d. logits, the worst case for the top-k, the two are within 0.01 of each other
at every width (the fused epilogue does not overlap its MMA at one CTA per SM; the chunked fold is
issue-bound), and the fused one is ahead on real code logits. Until a device decides, ``triton``
keeps the strategy whose GEMM is cuBLAS's. ``benchmarks/gpu_check.sh`` measures both per shape
class and prints the table to put here."""


def triton_strategy(d_model: int | None, k: int | None) -> LensImpl:
    """The Triton strategy ``triton`` runs for a model of width ``d_model`` and top-``k``.

    Unknown sizes (None) take the choice for the widest models and a small k.
    """
    if k is not None and k > FUSED_MAX_K:
        return LensImpl.TRITON_CHUNKED
    width = d_model if d_model is not None else 1 << 30
    for max_width, strategy in STRATEGY_BY_WIDTH:
        if width <= max_width:
            return strategy
    return STRATEGY_BY_WIDTH[-1][1]


TRITON_SUPPORTED = ">=3.6,<3.10"
"""The Triton releases the kernel is tested with (``make test``: 3.9; ``make test-triton36``: 3.6).
A release outside it may compile differently or break the interpreter, so it is refused."""


def _version_problem(dist: str, supported: str) -> str | None:
    """Why the installed ``dist`` is outside ``supported`` (None when it is inside)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    installed = importlib.metadata.version(dist)
    if SpecifierSet(supported).contains(Version(installed), prereleases=True):
        return None
    return f"{dist} {installed} is installed, but the kernel is tested with {dist}{supported}"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` (None when it can): not installed, a version
    outside ``TRITON_SUPPORTED``, no CUDA device (without the interpreter), or an interpreter that
    cannot run with the installed numpy."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install 'code-llm-lens[triton]')"
    problem = _version_problem("triton", TRITON_SUPPORTED)
    if problem is not None:
        return f"{problem}; pip install 'triton{TRITON_SUPPORTED}', or use impl 'torch'"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpret:
        from packaging.version import Version

        triton_v = Version(importlib.metadata.version("triton"))
        numpy_v = Version(importlib.metadata.version("numpy"))
        if triton_v < Version("3.7") and numpy_v >= Version("2.4"):
            # Triton 3.6's interpreter calls int() on 1-element arrays, an error since numpy 2.4.
            return (
                f"the CPU interpreter of triton {triton_v} cannot run with numpy {numpy_v}; "
                "pip install 'numpy<2.4' or 'triton>=3.7'"
            )
        return None
    return (
        f"Triton needs a CUDA device, got {device.type!r}; use impl 'torch' or 'auto' here, or set "
        "TRITON_INTERPRET=1 to run the kernel in Triton's (slow) CPU interpreter"
    )


def resolve_impl(
    impl: LensImpl | str,
    device: torch.device | str,
    *,
    d_model: int | None = None,
    k: int | None = None,
) -> LensImpl:
    """The implementation that will run for ``impl`` on ``device``: never AUTO or TRITON, which
    become ``TORCH`` or the strategy ``triton_strategy(d_model, k)`` picks.

    Raises:
        RuntimeError: an explicit Triton choice that cannot run here (the reason names the fix),
            or ``triton-fused`` with a k above ``FUSED_MAX_K``.
    """
    impl = LensImpl(impl)
    device = torch.device(device)
    if impl is LensImpl.AUTO:
        if device.type != "cuda":
            return LensImpl.TORCH
        reason = triton_unavailable_reason(device)
        if reason is not None:
            warnings.warn(
                f"lens.impl 'auto' runs the torch lens on {device}: the Triton kernels cannot "
                f"run ({reason})",
                RuntimeWarning,
                stacklevel=2,
            )
            return LensImpl.TORCH
        return triton_strategy(d_model, k)
    if impl.is_triton:
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"lens.impl {impl.value!r} cannot run: {reason}")
    if impl is LensImpl.TRITON:
        return triton_strategy(d_model, k)
    if impl is LensImpl.TRITON_FUSED and k is not None and k > FUSED_MAX_K:
        raise RuntimeError(
            f"lens.impl 'triton-fused' keeps at most k={FUSED_MAX_K} in registers, got k={k}; "
            "use impl 'triton' or 'triton-chunked' (its top-k for such k runs per chunk)"
        )
    return impl


def lens_stats(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    request: LensRequest,
    final_hidden: Tensor | None = None,
    *,
    impl: LensImpl | str = LensImpl.AUTO,
    budget_bytes: int | None = None,
    precision: str = "model",
) -> tuple[LensStats, LensImpl]:
    """Lens statistics of ``hidden [L, T, d]`` through ``head``; see ``lens_stats_torch`` for args.

    ``precision`` (``stats.PRECISIONS``): ``"model"``, the head's dtype where the device has tensor
    cores for it (fp32 heads take TF32 in the Triton strategies on a GPU), or ``"fp32"``, IEEE
    fp32 products of unrounded rows in every implementation.

    Returns:
        The statistics and the implementation that computed them.
    """
    chosen = resolve_impl(impl, hidden.device, d_model=head.d_model, k=request.k)
    if chosen.is_triton:
        # Imported here: these modules import triton.
        if chosen is LensImpl.TRITON_FUSED:
            from codelens.kernels.lens_triton import lens_stats_triton as run
        else:
            from codelens.kernels.lens_chunked import lens_stats_chunked as run

        # Triton launches on the *current* CUDA device; the rows may live on another one (the
        # last GPU of a model split over several), so make theirs current for the launch.
        on_device = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
        with on_device:
            return run(hidden, head, targets, request, final_hidden, precision=precision), chosen
    extra = {} if budget_bytes is None else {"budget_bytes": budget_bytes}
    stats = lens_stats_torch(
        hidden, head, targets, request, final_hidden, precision=precision, **extra
    )
    return stats, chosen
