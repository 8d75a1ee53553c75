"""Kernel-test fixtures: the same tests run in Triton's CPU interpreter and on a GPU.

The tests build their inputs on the CPU (seeded CPU generators). Under ``TRITON_INTERPRET=1`` the
kernels take them as they are. On a GPU the autouse fixture below wraps the Triton entry points a
``triton``-marked test module imported: tensor arguments (a ``Head``'s included) go to the GPU,
views of one tensor stay views of one copy (``final_hidden = hidden[-1]`` stays shared), and the
result's tensors come back to the CPU, where the float64 oracles run. ``benchmarks/gpu_check.sh``
runs these modules with ``--confcutdir tests/kernels``: the suite's top-level conftest and its
dependencies are not needed there.

fp32 heads: the interpreter multiplies fp32 operands in IEEE fp32, a GPU in TF32 by default
(``precision="model"``: 10 mantissa bits, the bf16 class of error, ``kernels/DESIGN.md``). The
oracle tests' tolerances are IEEE fp32's, so on a GPU the wrapper asks the strategies for
``precision="fp32"`` with an fp32 head where the test names no precision; a test that names one
(``test_lens_triton.py``'s TF32 test) gets it as written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ENTRY_POINTS = (
    "lens_stats",
    "lens_stats_triton",
    "lens_stats_chunked",
    "normalized_rows",
    "final_mixture",
    "kl_from_mixture",
)
"""Names a kernel test module calls the Triton code by; the fixture wraps those it has."""


def _to(value, device: torch.device, copies: dict):
    """``value`` with every tensor in it on ``device``; ``copies`` maps a storage to its copy."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        storage = value.untyped_storage()
        key = (storage.data_ptr(), value.dtype)
        if key not in copies:
            whole = value.new_empty(0).set_(storage, 0, (storage.nbytes() // value.element_size(),))
            copies[key] = whole.to(device)
        return copies[key].as_strided(value.shape, value.stride(), value.storage_offset())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: _to(getattr(value, f.name), device, copies)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **moved)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, copies) for v in value)
    return value


IEEE_BY_DEFAULT = ("lens_stats_triton", "lens_stats_chunked")
"""The entry points that take ``precision`` and multiply fp32 operands in TF32 on a GPU."""


def _fp32_head(args, kwargs) -> bool:
    head = kwargs.get("head", args[1] if len(args) > 1 else None)
    return getattr(head, "unembed", None) is not None and head.unembed.dtype == torch.float32


def on_device(fn, device: torch.device):
    """``fn`` run with its arguments on ``device`` and its result's tensors back on the CPU."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if (
            fn.__name__ in IEEE_BY_DEFAULT
            and "precision" not in kwargs
            and _fp32_head(args, kwargs)
        ):
            kwargs["precision"] = "fp32"
        copies: dict = {}
        args = _to(args, device, copies)
        kwargs = {name: _to(v, device, copies) for name, v in kwargs.items()}
        return _to(fn(*args, **kwargs), torch.device("cpu"), {})

    return wrapped


@pytest.fixture(autouse=True)
def _kernels_on_the_gpu(request, monkeypatch):
    """Without the interpreter, a ``triton``-marked module's entry points run on ``cuda``."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret or not torch.cuda.is_available() or not request.node.get_closest_marker("triton"):
        return
    module = request.module
    for name in ENTRY_POINTS:
        if hasattr(module, name):
            monkeypatch.setattr(
                module, name, on_device(getattr(module, name), torch.device("cuda"))
            )


_HOST_READS = frozenset(
    ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal")
    + ("_unique2", "unique_consecutive", "unique_dim")
)
"""The torch ops whose result needs a tensor's values on the host (on a GPU: a wait for every
queued kernel). A boolean-mask index is one too: the mask is turned into indices."""


class _ForbidHostReads(TorchDispatchMode):
    """Raises on any op of ``_HOST_READS`` and on indexing with a boolean mask."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name in _HOST_READS or bool_index:
            raise AssertionError(f"{func} reads tensor values on the host")
        return func(*args, **(kwargs or {}))


@dataclasses.dataclass(frozen=True)
class DeviceReads:
    """Where the Triton strategies run in this session (``cuda``, or the CPU under the
    interpreter), and a context under which the host may not read a tensor value back."""

    device: torch.device

    def on_device(self, value):
        """``value`` (tensors, dataclasses such as a ``Head``, tuples) with its tensors moved."""
        return _to(value, self.device, {})

    @contextlib.contextmanager
    def forbidden(self):
        """On a GPU, CUDA sync debugging set to "error": any call that waits for the device
        raises (a scalar read, a blocking or pageable copy). On the CPU, the same contract as far as
        torch shows it: the ops that read values on the host raise (``_ForbidHostReads``)."""
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with _ForbidHostReads():
                yield


@pytest.fixture
def device_reads() -> DeviceReads:
    """``DeviceReads`` for this session's kernel device."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    on_gpu = torch.cuda.is_available() and not interpret
    return DeviceReads(torch.device("cuda" if on_gpu else "cpu"))
