"""Kernel-test fixtures: the same tests run in Triton's CPU interpreter and on a GPU.

The tests build their inputs on the CPU (seeded CPU generators). Under ``TRITON_INTERPRET=1`` the
kernels take them as they are. On a GPU the autouse fixture below wraps the Triton entry points a
``triton``-marked test module imported: tensor arguments (a ``Head``'s included) go to the GPU,
views of one tensor stay views of one copy (``final_hidden = hidden[-1]`` stays shared), and the
result's tensors come back to the CPU, where the float64 oracles run. ``benchmarks/gpu_check.sh``
runs these modules with ``--confcutdir tests/kernels``: the suite's top-level conftest and its
dependencies are not needed there.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch

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


def on_device(fn, device: torch.device):
    """``fn`` run with its arguments on ``device`` and its result's tensors back on the CPU."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
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
