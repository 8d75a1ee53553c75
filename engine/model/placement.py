"""Where a model's weights go: every weight on one device, or one model split over several.

A model too large for one GPU is split *by blocks* (``execution.gpus_per_worker: N``), the way a
forward pass walks it::

    device 0:      embeddings (and whatever precedes the blocks: position tables, dropout)
                   blocks 0 .. b_1 - 1
    device 1:      blocks b_1 .. b_2 - 1
    ...
    device N - 1:  blocks b_{N-1} .. L - 1, final norm, LM head   <- the lens reads here
                   (and whatever follows the blocks: rotary tables some families register last)

Each device holds one contiguous range of blocks, so the residual stream crosses each device
boundary once per forward pass (one ``[B, S, d]`` copy). The lens head (final norm and ``W_U``)
sits on the last device, and the captured residual rows of every layer are gathered there
(``ResidualCapture`` copies each block's output into one buffer on that device), so the lens
kernels see one device. A model whose LM head *is* its embedding matrix (tied embeddings) keeps
one copy of it: the head then sits with the embeddings on the first device, and the lens reads
there.

**The split.** With ``w_i`` the bytes of weights fixed on device ``i`` (embeddings on the first,
head on the last), ``s_j`` the bytes of block ``j`` and ``c_i`` the weight budget of device ``i``,
:func:`plan_device_map` picks the contiguous ranges that minimise the fullest device's share
``max_i (w_i + sum_{j on i} s_j) / c_i``, subject to every share being <= 1. (Greedy filling to a
share ``u`` is optimal for a given ``u``; ``u`` is found by bisection.) Equal blocks on equal GPUs
give equal ranges, shifted by the embedding and head bytes.

**The budget.** A GPU holds more than weights: the CUDA context (~0.5-1 GiB), one batch's
activations (``execution.batch_tokens`` tokens through one block at a time), the capture buffer
on the lens device (``slots x batch_tokens x d`` in the model dtype, slots = L + 1 for all layers:
5.9 GiB for a 62-block, d = 6144 model at 8192 tokens in bf16) and the lens kernels' workspace.
So weights may take only ``execution.weights_memory_fraction`` (default 0.8) of each GPU's memory
(:func:`gpu_budgets`); the rest is that headroom (16 GiB of an H100 80 GB, 28 GiB of an H200). A
batch that still does not fit is split and retried (``ShardRunner``).

The planner is pure (module sizes and device budgets in, a device map out), so it is tested
without GPUs; :func:`plan_placement` measures a real model on the ``meta`` device (no memory) and
calls it. The device map is handed to ``from_pretrained(device_map=...)``, which loads each weight
straight onto its device in the target dtype, and accelerate's hooks move the activations from
device to device during the forward pass (including the last-blocks replay of
``lens.decoder_blocks``: each replayed block runs on its own device).
"""

from __future__ import annotations

import enum
import importlib.metadata
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from codelens.engine.errors import ModelLoadError
from codelens.engine.model.surgery import ModelParts

DEFAULT_WEIGHTS_MEMORY_FRACTION = 0.8
"""Share of each GPU's memory the weights may take when a model is split (``ExecutionSpec``)."""

ACCELERATE_SUPPORTED = ">=1.1"
"""accelerate releases a ``device_map`` load is run with: transformers 5's own minimum (older ones
it treats as absent), and pyproject.toml's floor."""

NO_COMPUTE = frozenset({"disk", "meta"})
"""``device_map`` values that hold weights but run nothing: accelerate's ``"disk"`` offload (the
weights are read onto the execution device for each forward pass). The lens head and the token ids
cannot live there."""


class UnitRole(str, enum.Enum):
    """Which part of the forward pass a placement unit belongs to."""

    INPUT = "input"
    """Registered before the blocks: embeddings, position tables (first device)."""
    BLOCK = "block"
    """A decoder block (split over the devices in order)."""
    HEAD = "head"
    """Registered after the blocks: the final norm, the LM head (the lens head), rotary tables
    some families register last (last device, or first when the head is tied)."""


@dataclass(frozen=True)
class ModuleUnit:
    """A module that goes to one device whole.

    Attributes:
        name: its dotted name in the model (a ``device_map`` key).
        nbytes: bytes of its parameters and buffers, each tensor counted once in the whole model
            (a tied LM head is 0: its matrix is the embedding's).
        role: where in the forward pass it runs.
    """

    name: str
    nbytes: int
    role: UnitRole


@dataclass(frozen=True)
class ModelLayout:
    """What the planner needs to know of a model.

    Attributes:
        units: every module that holds tensors, each once (blocks in forward order).
        tied_head: the LM head's matrix is the input embedding matrix.
        dtype: the dtype the sizes were measured in (for messages).
    """

    units: tuple[ModuleUnit, ...]
    tied_head: bool = False
    dtype: torch.dtype | None = None

    def of(self, role: UnitRole) -> list[ModuleUnit]:
        """The units of one role, in model order."""
        return [u for u in self.units if u.role is role]

    @property
    def nbytes(self) -> int:
        """Bytes of all weights and buffers."""
        return sum(u.nbytes for u in self.units)


@dataclass(frozen=True)
class DeviceBudget:
    """A device and the bytes of weights it may hold.

    Attributes:
        device: a ``device_map`` value: ``"cuda:N"``, ``"cpu"``, or accelerate's ``"disk"``
            (weights kept in ``offload_folder`` and read in for each forward pass).
        weight_bytes: the most bytes of weights planned onto it.
    """

    device: str
    weight_bytes: int


@dataclass(frozen=True)
class Placement:
    """A model split over devices (:func:`plan_device_map`).

    Attributes:
        device_map: module name -> device, for ``from_pretrained(device_map=...)``.
        devices: the devices, in forward order.
        device_bytes: bytes of weights planned onto each device.
        budgets: each device's weight budget.
        blocks: the block indices each device holds (contiguous; empty ranges possible).
        head_device: where the final norm and LM head live: the lens runs there.
        input_device: where the token ids go: the first device that computes (the embeddings').
        block_names: the blocks' module names, in order (``device_map`` keys).
    """

    device_map: dict[str, str]
    devices: tuple[str, ...]
    device_bytes: tuple[int, ...]
    budgets: tuple[int, ...]
    blocks: tuple[range, ...]
    head_device: str
    input_device: str
    block_names: tuple[str, ...] = ()

    def describe(self) -> list[dict[str, Any]]:
        """Per device: name, block range and weight GiB (recorded in ``job.json``)."""
        return [
            {
                "device": device,
                "blocks": [r.start, r.stop - 1] if len(r) else [],
                "weight_gib": round(nbytes / 2**30, 3),
                "budget_gib": round(budget / 2**30, 3),
            }
            for device, r, nbytes, budget in zip(
                self.devices, self.blocks, self.device_bytes, self.budgets, strict=True
            )
        ]


def human_bytes(n: float) -> str:
    """``n`` bytes as KiB / MiB / GiB / TiB with 3 significant figures."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


# -- the planner (pure) -----------------------------------------------------------------------


def plan_device_map(layout: ModelLayout, budgets: Sequence[DeviceBudget]) -> Placement:
    """Split a model over ``budgets`` (in forward order): inputs first, blocks, head last.

    Input units go to the first device, head units to the last (the first when the head is tied
    to the embeddings), and the blocks are cut into contiguous ranges that minimise the fullest
    device's share of its budget (module docstring).

    Args:
        layout: the model's units (:func:`model_layout`).
        budgets: the devices in order, each with the bytes of weights it may hold.

    Returns:
        The placement; every unit of ``layout`` is a key of its ``device_map``.

    Raises:
        ModelLoadError: no devices, a device named twice, the head's device is one that runs
            nothing (``"disk"``), or the weights do not fit the budgets (with the sizes and the
            number of devices it would take).
    """
    if not budgets:
        raise ModelLoadError("a placement needs at least one device")
    devices = [b.device for b in budgets]
    if len(set(devices)) != len(devices):
        raise ModelLoadError(f"devices {devices} name a device more than once")
    n = len(budgets)
    head_index = 0 if layout.tied_head else n - 1
    if devices[head_index] in NO_COMPUTE:
        raise ModelLoadError(
            f"the lens head (final norm and LM head) would be placed on {devices[head_index]!r}, "
            "which holds weights but computes nothing: the "
            f"{'first' if layout.tied_head else 'last'} device must be a GPU or the CPU"
        )
    compute = [d for d in devices if d not in NO_COMPUTE]
    fixed = [0] * n
    fixed[0] += sum(u.nbytes for u in layout.of(UnitRole.INPUT))
    fixed[head_index] += sum(u.nbytes for u in layout.of(UnitRole.HEAD))
    blocks = layout.of(UnitRole.BLOCK)
    sizes = [u.nbytes for u in blocks]
    caps = [b.weight_bytes for b in budgets]

    cuts = _fill(sizes, fixed, caps, share=1.0)
    if cuts is None:
        raise ModelLoadError(_does_not_fit(layout, budgets, fixed))
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection on the fullest share: 60 halvings reach float precision
        mid = (low + high) / 2
        trial = _fill(sizes, fixed, caps, share=mid)
        if trial is None:
            low = mid
        else:
            high, cuts = mid, trial

    ranges = tuple(range(cuts[i], cuts[i + 1]) for i in range(n))
    loads = [fixed[i] + sum(sizes[j] for j in ranges[i]) for i in range(n)]
    device_map: dict[str, str] = {}
    for unit in layout.units:
        if unit.role is UnitRole.INPUT:
            device_map[unit.name] = devices[0]
        elif unit.role is UnitRole.HEAD:
            device_map[unit.name] = devices[head_index]
    for i, r in enumerate(ranges):
        for j in r:
            device_map[blocks[j].name] = devices[i]
    ordered = {u.name: device_map[u.name] for u in layout.units}  # model order, for reading
    return Placement(
        device_map=ordered,
        devices=tuple(devices),
        device_bytes=tuple(loads),
        budgets=tuple(caps),
        blocks=ranges,
        head_device=devices[head_index],
        input_device=compute[0],
        block_names=tuple(u.name for u in blocks),
    )


def _fill(
    sizes: Sequence[int], fixed: Sequence[int], caps: Sequence[int], share: float
) -> list[int] | None:
    """Block cut points ``[0, b_1, ..., L]`` when each device is filled in order up to
    ``share x cap`` (blocks kept whole and in order); None if some block or fixed part does not
    fit. For a given share this greedy fill succeeds whenever any contiguous split does."""
    limits = [share * c for c in caps]
    if any(f > lim for f, lim in zip(fixed, limits, strict=True)):
        return None
    cuts = [0]
    device, load = 0, fixed[0]
    for j, size in enumerate(sizes):
        while load + size > limits[device]:
            device += 1
            if device == len(caps):
                return None
            cuts.append(j)
            load = fixed[device]
        load += size
    cuts += [len(sizes)] * (len(caps) + 1 - len(cuts))
    return cuts


def _does_not_fit(layout: ModelLayout, budgets: Sequence[DeviceBudget], fixed: list[int]) -> str:
    """The error message of a model that fits no split over ``budgets``: sizes and the fix."""
    blocks = layout.of(UnitRole.BLOCK)
    largest = max(blocks, key=lambda u: u.nbytes) if blocks else None
    dtype = f" in {str(layout.dtype).removeprefix('torch.')}" if layout.dtype else ""
    inputs = sum(u.nbytes for u in layout.of(UnitRole.INPUT))
    head = sum(u.nbytes for u in layout.of(UnitRole.HEAD))
    sizes = (
        f"the model's weights take {human_bytes(layout.nbytes)}{dtype} (embeddings and other "
        f"input modules {human_bytes(inputs)}, {len(blocks)} blocks "
        f"{human_bytes(sum(u.nbytes for u in blocks))}"
        + (f" (the largest, {largest.name}, {human_bytes(largest.nbytes)})" if largest else "")
        + f", final norm and LM head {human_bytes(head)})"
    )
    room = ", ".join(f"{b.device} {human_bytes(b.weight_bytes)}" for b in budgets)
    total_room = sum(b.weight_bytes for b in budgets)
    biggest_room = max(b.weight_bytes for b in budgets)
    if layout.nbytes > total_room:
        needed = math.ceil(layout.nbytes / max(1, biggest_room))
        fix = (
            f"it needs at least {needed} devices of {human_bytes(biggest_room)}: raise "
            f"execution.gpus_per_worker to {needed} or more, or load a smaller model.dtype"
        )
    elif largest is not None and largest.nbytes > biggest_room:
        fix = (
            "one block alone is larger than a device may hold; raise "
            "execution.weights_memory_fraction, or use GPUs with more memory"
        )
    else:
        fix = (
            "blocks stay whole, so the last bytes do not fit; raise execution.gpus_per_worker by "
            "one, or execution.weights_memory_fraction"
        )
    return (
        f"{sizes}, but the {len(budgets)} device(s) may hold {human_bytes(total_room)} of "
        f"weights ({room}): {fix}."
    )


# -- measuring a real model -------------------------------------------------------------------


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def decoder_block_list(model: nn.Module) -> str:
    """The dotted name of the model's decoder blocks: the outermost ``nn.ModuleList`` holding
    ``num_hidden_layers`` modules (the text config's, for a multimodal one).

    Found from the module tree alone, so it works on the ``meta`` device for every family (the
    surgery table's and the general rule's alike); :func:`check_placement` confirms after the
    load that the lens reads these very blocks.

    Raises:
        ModelLoadError: no such list, or more than one (the model cannot be split by blocks).
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None)
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and n_layers and len(module) == n_layers and name
    ]
    outermost = [n for n in lists if not any(n.startswith(other + ".") for other in lists)]
    if len(outermost) != 1:
        found = ", ".join(outermost) if outermost else "none"
        raise ModelLoadError(
            f"{type(model).__name__} cannot be split over several devices: it needs one list of "
            f"config.num_hidden_layers = {n_layers} decoder blocks, found {found}; run it on one "
            "device (execution.gpus_per_worker: 1)"
        )
    return outermost[0]


def model_layout(model: nn.Module) -> ModelLayout:
    """Cut a model (typically on the ``meta`` device) into placement units and measure them.

    The walk follows the forward pass through the module tree: the decoder blocks
    (:func:`decoder_block_list`) are BLOCK units; a module registered *before* the block list
    (and not inside it) is an INPUT unit (embeddings, position tables, dropout), one registered
    *after* it is a HEAD unit (the final norm, and rotary tables that some families register
    last), and so is the LM head (``get_output_embeddings()``). Modules that contain the block
    list are walked into; a tensor such a module holds itself (GPT-BigCode's causal-mask buffer)
    is a unit of its own, named by the tensor. Sizes are ``numel x element_size`` of each
    parameter and buffer as the model holds them (so build it in the dtype it will be loaded in),
    each tensor counted once (a tied LM head is 0 bytes).

    Raises:
        ModelLoadError: the model has no single list of decoder blocks.
    """
    block_list = decoder_block_list(model)
    out_embed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out_weight = getattr(out_embed, "weight", None)
    tied = out_weight is not None and out_weight is getattr(in_embed, "weight", None)
    seen: set[int] = set()
    units: list[ModuleUnit] = []

    def measure(module: nn.Module) -> int:
        total = 0
        for t in _tensors(module):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def visit(prefix: str, module: nn.Module) -> None:
        for tensor_name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            seen.add(id(tensor))
            nbytes = tensor.numel() * tensor.element_size()
            units.append(ModuleUnit(prefix + tensor_name, nbytes, UnitRole.INPUT))
        role = UnitRole.INPUT  # until the walk has passed the block list
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name == block_list:
                for block_name, block in child.named_children():
                    block_unit = ModuleUnit(f"{name}.{block_name}", measure(block), UnitRole.BLOCK)
                    units.append(block_unit)
                role = UnitRole.HEAD
            elif block_list.startswith(name + "."):
                visit(name + ".", child)
                role = UnitRole.HEAD
            elif any(True for _ in _tensors(child)):
                is_head = child is out_embed
                units.append(ModuleUnit(name, measure(child), UnitRole.HEAD if is_head else role))

    visit("", model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return ModelLayout(tuple(units), tied_head=tied, dtype=dtype)


def plan_placement(
    config: Any,
    budgets: Sequence[DeviceBudget],
    *,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Placement:
    """Plan a model of ``config`` over ``budgets`` without loading a weight.

    The model is built on the ``meta`` device (shapes and dtypes, no memory) in ``dtype``, cut
    into units (:func:`model_layout`) and split (:func:`plan_device_map`).

    Raises:
        ModelLoadError: transformers cannot build the model class, it has no single list of
            decoder blocks, or it does not fit.
    """
    from codelens.engine.model.loading import auto_model_class

    try:
        with torch.device("meta"):
            empty = auto_model_class(config).from_config(
                config,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
    except Exception as exc:  # transformers raises ValueError/KeyError/TypeError here
        raise ModelLoadError(
            f"cannot build the model of {type(config).__name__} to plan its placement: {exc}"
        ) from exc
    return plan_device_map(model_layout(empty), budgets)


def check_placement(model: nn.Module, parts: ModelParts, placement: Placement) -> None:
    """Confirm, once the model is loaded, that the split is the one the lens needs: the blocks
    the lens hooks are the blocks that were split, and every tensor of the lens head (final
    norm, ``W_U``, ``b_U``) is on the head's device.

    Raises:
        ModelLoadError: either is not so (a layout the structural walk of :func:`model_layout`
            misread), naming the module or tensor and the fix.
    """
    names = {id(m): name for name, m in model.named_modules()}
    hooked = tuple(names.get(id(b), "?") for b in parts.blocks)
    if hooked != placement.block_names:
        raise ModelLoadError(
            f"{type(model).__name__}: the lens reads the blocks {hooked[0]}..{hooked[-1]}, but the "
            f"split was planned over {', '.join(placement.block_names[:2])}...; run it on one "
            "device (execution.gpus_per_worker: 1)"
        )
    head = parts.head
    tensors = {
        "final norm weight": head.norm.weight,
        "final norm bias": head.norm.bias,
        "unembedding W_U": head.unembed,
        "unembedding bias": head.unembed_bias,
    }
    target = torch.device(placement.head_device)
    for what, tensor in tensors.items():
        if tensor is not None and tensor.device != target:
            raise ModelLoadError(
                f"{type(model).__name__}: the lens head's {what} is on {tensor.device}, not on "
                f"{target} with the LM head (the final norm is registered before the blocks?); "
                "run it on one device (execution.gpus_per_worker: 1)"
            )


# -- the devices of this process --------------------------------------------------------------


def gpu_budgets(
    count: int, weights_fraction: float = DEFAULT_WEIGHTS_MEMORY_FRACTION
) -> list[DeviceBudget]:
    """The first ``count`` visible CUDA devices, each with ``weights_fraction`` of its memory as
    its weight budget: ``[DeviceBudget("cuda:0", f x total_0), ...]``.

    Under Ray an actor sees exactly the GPUs it reserved (``num_gpus``), as ``cuda:0..N-1``.

    Raises:
        ModelLoadError: fewer than ``count`` CUDA devices are visible (how many, and the fix).
    """
    if not 0 < weights_fraction <= 1:
        raise ModelLoadError(
            f"execution.weights_memory_fraction is {weights_fraction}; it must be in (0, 1]"
        )
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < count:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else ""
        raise ModelLoadError(
            f"execution.gpus_per_worker is {count}, but this process sees {visible} CUDA "
            f"device(s){seen}: lower execution.gpus_per_worker to {max(1, visible)}, or make "
            f"{count} GPUs visible to each worker"
        )
    return [
        DeviceBudget(
            f"cuda:{i}", int(torch.cuda.get_device_properties(i).total_memory * weights_fraction)
        )
        for i in range(count)
    ]


def require_accelerate() -> None:
    """Raise ModelLoadError unless accelerate is installed inside ``ACCELERATE_SUPPORTED``:
    transformers needs it for any ``device_map`` (loading straight onto a GPU, or a split)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    wanted = f"accelerate{ACCELERATE_SUPPORTED}"
    try:
        installed = importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is None or not SpecifierSet(ACCELERATE_SUPPORTED).contains(
        Version(installed), prereleases=True
    ):
        have = "is not installed" if installed is None else f"{installed} is installed"
        raise ModelLoadError(
            f"accelerate {have}, but loading a model onto a GPU, or split over several devices, "
            f"needs {wanted} (transformers places the weights with it): pip install '{wanted}' "
            "(or run ./install.sh, which installs the tested versions)"
        )
