"""Choose the lens implementation: ``auto | torch | triton``.

``auto`` runs the fused Triton kernel on a CUDA device and the vocab-chunked torch path elsewhere.
An explicit ``triton`` never falls back: where Triton cannot run it raises with the reason and the
fix. On a CPU it runs only under ``TRITON_INTERPRET=1`` (slowly; for tests). Nothing here imports
Triton or touches CUDA at import time.
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
    """Which lens implementation runs."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


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


def resolve_impl(impl: LensImpl | str, device: torch.device | str) -> LensImpl:
    """The implementation that will run for ``impl`` on ``device`` (never AUTO)."""
    impl = LensImpl(impl)
    device = torch.device(device)
    if impl is LensImpl.AUTO:
        if device.type != "cuda":
            return LensImpl.TORCH
        reason = triton_unavailable_reason(device)
        if reason is not None:
            warnings.warn(
                f"lens.impl 'auto' runs the torch lens on {device}: the Triton kernel cannot "
                f"run ({reason})",
                RuntimeWarning,
                stacklevel=2,
            )
            return LensImpl.TORCH
        return LensImpl.TRITON
    if impl is LensImpl.TRITON:
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"lens.impl 'triton' cannot run: {reason}")
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
) -> tuple[LensStats, LensImpl]:
    """Lens statistics of ``hidden [L, T, d]`` through ``head``; see ``lens_stats_torch`` for args.

    Returns:
        The statistics and the implementation that computed them.
    """
    chosen = resolve_impl(impl, hidden.device)
    if chosen is LensImpl.TRITON:
        from codelens.kernels.lens_triton import lens_stats_triton  # imports triton lazily

        # Triton launches on the *current* CUDA device; the rows may live on another one (the
        # last GPU of a model split over several), so make theirs current for the launch.
        on_device = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
        with on_device:
            return lens_stats_triton(hidden, head, targets, request, final_hidden), chosen
    extra = {} if budget_bytes is None else {"budget_bytes": budget_bytes}
    return lens_stats_torch(hidden, head, targets, request, final_hidden, **extra), chosen
