"""One model over several devices: the planner, the measured layout, and a real split on the CPU.

The planner is pure (sizes and budgets in, a device map out), so its promises are checked on
made-up layouts: embeddings first, head last (first when tied), blocks in contiguous ranges that
minimise the fullest device (checked against every possible split), budgets respected, and a
model that does not fit refused with its sizes. A real split runs without GPUs by giving
``load_model`` two device names the CPU can serve: the CPU, and accelerate's ``"disk"`` (weights
kept in a folder and read in by accelerate's hooks for each forward pass), so the lens statistics
of a model dispatched over two devices are compared with the same model on one, for families of
the surgery table and of the general rule (mixture-of-experts ones among them).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import fields

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codelens.engine.errors import ModelLoadError, SpecError
from codelens.engine.model.loading import load_model
from codelens.engine.model.placement import (
    DeviceBudget,
    ModelLayout,
    ModuleUnit,
    UnitRole,
    check_placement,
    gpu_budgets,
    model_layout,
    plan_device_map,
)
from codelens.engine.run.pipeline import LensPipeline, TextInput
from codelens.engine.run.request import resolve_lens
from codelens.engine.schemas import LensSpec, validate_spec
from codelens.engine.zoo.tiny_models import MODERN_FAMILIES, TINY_FAMILIES

GB = 10**9


def layout(blocks: list[int], inputs: int = 0, head: int = 0, *, tied: bool = False) -> ModelLayout:
    """A made-up model: one input unit, the blocks, a final norm (``head`` bytes) and LM head."""
    units = [ModuleUnit("model.embed_tokens", inputs, UnitRole.INPUT)]
    units += [ModuleUnit(f"model.layers.{i}", b, UnitRole.BLOCK) for i, b in enumerate(blocks)]
    units += [
        ModuleUnit("model.norm", head, UnitRole.HEAD),
        ModuleUnit("lm_head", 0, UnitRole.HEAD),
        ModuleUnit("model.rotary_emb", 0, UnitRole.INPUT),  # after the blocks, as in Llama
    ]
    return ModelLayout(tuple(units), tied_head=tied)


def budgets(*weight_bytes: int) -> list[DeviceBudget]:
    return [DeviceBudget(f"cuda:{i}", b) for i, b in enumerate(weight_bytes)]


def best_share(sizes: list[int], fixed: list[int], caps: list[int]) -> float:
    """The smallest fullest-device share over every contiguous split (exhaustive)."""
    n, best = len(caps), float("inf")
    for cuts in itertools.combinations_with_replacement(range(len(sizes) + 1), n - 1):
        bounds = [0, *cuts, len(sizes)]
        loads = [fixed[i] + sum(sizes[bounds[i] : bounds[i + 1]]) for i in range(n)]
        if all(load <= cap for load, cap in zip(loads, caps, strict=True)):
            best = min(best, max(load / cap for load, cap in zip(loads, caps, strict=True)))
    return best


# --- the planner -----------------------------------------------------------------------------


def test_embeddings_first_head_last_blocks_split_evenly():
    placement = plan_device_map(
        layout([GB] * 10, inputs=2 * GB, head=2 * GB), budgets(*[10 * GB] * 2)
    )
    dm = placement.device_map
    assert dm["model.embed_tokens"] == dm["model.rotary_emb"] == "cuda:0"
    assert dm["model.norm"] == dm["lm_head"] == "cuda:1" == placement.head_device
    assert placement.input_device == "cuda:0"
    assert placement.blocks == (range(0, 5), range(5, 10))
    assert placement.device_bytes == (7 * GB, 7 * GB)
    assert [dm[f"model.layers.{i}"] for i in range(10)] == ["cuda:0"] * 5 + ["cuda:1"] * 5
    assert list(dm) == [u.name for u in layout([GB] * 10).units]  # every unit, in model order


def test_a_tied_head_stays_with_the_embeddings():
    placement = plan_device_map(layout([GB] * 6, inputs=2 * GB, tied=True), budgets(8 * GB, 8 * GB))
    dm = placement.device_map
    assert dm["lm_head"] == dm["model.norm"] == dm["model.embed_tokens"] == "cuda:0"
    assert placement.head_device == "cuda:0"
    assert placement.blocks == (range(0, 2), range(2, 6))  # 2 + 2 | 4: the embeddings count


@pytest.mark.parametrize("seed", range(40))
def test_the_split_is_contiguous_within_budget_and_minimises_the_fullest_device(seed):
    rng = random.Random(seed)
    n_dev = rng.randint(2, 4)
    sizes = [rng.randint(1, 9) * 100 for _ in range(rng.randint(n_dev, 9))]
    inputs, head = rng.randint(0, 900), rng.randint(0, 900)
    caps = [rng.randint(8, 30) * 100 for _ in range(n_dev)]
    model = layout(sizes, inputs=inputs, head=head)
    fixed = [inputs] + [0] * (n_dev - 2) + [head]
    optimum = best_share(sizes, fixed, caps)
    if optimum == float("inf"):
        with pytest.raises(ModelLoadError):
            plan_device_map(model, budgets(*caps))
        return
    placement = plan_device_map(model, budgets(*caps))
    ranges = placement.blocks
    assert ranges[0].start == 0 and ranges[-1].stop == len(sizes)
    assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))  # contiguous, in order
    assert all(load <= cap for load, cap in zip(placement.device_bytes, caps, strict=True))
    share = max(load / cap for load, cap in zip(placement.device_bytes, caps, strict=True))
    assert share == pytest.approx(optimum, rel=1e-9)
    assert sum(placement.device_bytes) == model.nbytes


def test_a_larger_device_takes_more_blocks():
    placement = plan_device_map(layout([GB] * 12), budgets(16 * GB, 8 * GB))
    assert [len(r) for r in placement.blocks] == [8, 4]


def test_a_model_larger_than_the_devices_is_refused_with_its_sizes():
    model = ModelLayout(
        layout([15 * GB] * 62, inputs=3 * GB, head=3 * GB).units, dtype=torch.bfloat16
    )
    with pytest.raises(ModelLoadError) as info:
        plan_device_map(model, budgets(*[112 * GB] * 8))
    message = str(info.value)
    assert "weights take 872 GiB in bfloat16" in message
    assert "62 blocks" in message and "8 device(s) may hold 834 GiB" in message
    assert "at least 9 devices" in message and "execution.gpus_per_worker to 9" in message


def test_a_block_larger_than_any_device_is_named():
    with pytest.raises(ModelLoadError, match="one block alone is larger") as info:
        plan_device_map(layout([GB, 5 * GB, GB]), budgets(4 * GB, 4 * GB, 4 * GB))
    assert "model.layers.1, 4.66 GiB" in str(info.value)


def test_the_head_cannot_go_where_nothing_computes():
    devices = [DeviceBudget("cpu", GB), DeviceBudget("disk", GB)]
    with pytest.raises(ModelLoadError, match="last device must be a GPU or the CPU"):
        plan_device_map(layout([1, 1]), devices)
    placement = plan_device_map(layout([1, 1], tied=True), devices)  # the head is first then
    assert placement.head_device == "cpu"
    with pytest.raises(ModelLoadError, match="more than once"):
        plan_device_map(layout([1, 1]), budgets(GB, GB)[:1] * 2)


# --- measuring real models -------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES + MODERN_FAMILIES)
def test_the_layout_follows_the_lens_parts_and_covers_every_tensor_once(
    family, tiny_model_dir, tiny_loaded_model
):
    """For the surgery table's families and the general rule's: the blocks the walk finds are
    the blocks the lens hooks, the final norm and LM head are head units, every tensor has one
    unit, and the layout measured on the meta device (before loading) is the loaded model's."""
    loaded = tiny_loaded_model(family)
    model, parts = loaded.model, loaded.parts
    found = model_layout(model)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [names[id(b)] for b in parts.blocks]
    assert [u.name for u in found.of(UnitRole.BLOCK)] == blocks
    head_units = [u.name for u in found.of(UnitRole.HEAD)]
    norm = next(  # the module whose weight the lens head's norm reads
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.data_ptr() == parts.head.norm.weight.data_ptr()
        and not any(n.startswith(b + ".") for b in blocks)
    )
    assert any(norm == u or norm.startswith(u + ".") for u in head_units), (norm, head_units)
    assert names[id(model.get_output_embeddings())] in head_units
    assert found.tied_head == parts.tied_embeddings
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in tensors:  # each tensor's device comes from exactly one unit
        owners = [u for u in found.units if name == u.name or name.startswith(u.name + ".")]
        assert len(owners) == 1, (name, owners)
    unique = {id(t): t for t in tensors.values()}.values()
    assert found.nbytes == sum(t.numel() * t.element_size() for t in unique)

    config = AutoConfig.from_pretrained(tiny_model_dir(family))
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    assert model_layout(empty) == found


def test_too_few_visible_gpus_are_named_with_the_fix():
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ModelLoadError) as info:
        gpu_budgets(visible + 1)
    message = str(info.value)
    assert f"gpus_per_worker is {visible + 1}, but this process sees {visible} CUDA" in message
    assert "lower execution.gpus_per_worker" in message


@pytest.mark.parametrize(
    "execution,model,expected",
    [
        ({"gpus_per_worker": 0}, {}, "greater than or equal to 1"),
        ({"gpus_per_worker": 2}, {"device": "cpu"}, "model.device is 'cpu': set model.device"),
        ({"weights_memory_fraction": 0}, {}, "weights_memory_fraction: Input should be greater"),
        ({"weights_memory_fraction": 1.5}, {}, "less than or equal to 1"),
    ],
)
def test_the_spec_refuses_splits_it_cannot_run(execution, model, expected):
    data = {"model": {"path": "m", **model}, "corpus": {"paths": ["*.py"]}, "execution": execution}
    with pytest.raises(SpecError, match=expected):
        validate_spec(data)
    assert validate_spec({**data, "model": {"path": "m"}, "execution": {"gpus_per_worker": 4}})


# --- a real split, on the CPU ----------------------------------------------------------------

SPLITS = {
    # family, model builder arguments, devices (forward order), lens sites
    "llama: disk then cpu": ("llama", {"n_layers": 4}, ("disk", "cpu"), ["block", "attn"]),
    # Tied: the head (and the lens) stays on the first device with the embeddings.
    "gpt2 (tied): cpu then disk": (
        "gpt2",
        {"n_layers": 6, "d_model": 64},
        ("cpu", "disk"),
        ["block"],
    ),
    # Mixture-of-experts families the general rule reads (the ones large enough to need a split).
    "qwen3_moe: disk then cpu": ("qwen3_moe", {"n_layers": 4}, ("disk", "cpu"), ["block", "attn"]),
    "deepseek_v3: disk then cpu": ("deepseek_v3", {"n_layers": 4}, ("disk", "cpu"), ["block"]),
    "gpt_oss: disk then cpu": ("gpt_oss", {"n_layers": 4}, ("disk", "cpu"), ["block", "attn"]),
    "glm4_moe: disk then cpu": ("glm4_moe", {"n_layers": 4}, ("disk", "cpu"), ["block"]),
    "gemma2 (tied, soft-cap): cpu then disk": (
        "gemma2",
        {"n_layers": 4},
        ("cpu", "disk"),
        ["block", "attn"],
    ),
}


def lens_statistics(loaded, spec: LensSpec):
    """The pipeline's statistics of two code snippets (one padded shorter than the other)."""
    pipeline = LensPipeline(loaded, resolve_lens(spec, loaded))
    text = "def area(r):\n    return 3.14159 * r * r\n\nclass Box:\n    size = 2\n"
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = loaded.tokenizer.bos_token_id
    inputs = [TextInput.of(ids, [2, 3], bos), TextInput.of(ids[:11], [2, 3], bos)]
    return pipeline(inputs).stats


@pytest.mark.parametrize("case", SPLITS)
def test_a_split_model_gives_the_statistics_of_the_whole_one(case, tiny_model_dir, tmp_path):
    family, build, devices, sites = SPLITS[case]
    model_dir = tiny_model_dir(family, **build)
    whole = load_model(model_dir, device="cpu", dtype="float32")
    split = load_model(
        model_dir,
        device="cpu",
        dtype="float32",
        devices=[DeviceBudget(d, 2**30) for d in devices],
        offload_folder=tmp_path / "offload",
    )
    placement = split.placement
    # The split is real: each device holds blocks, transformers dispatched our map, and the
    # blocks on "disk" have no weights in memory (accelerate reads them in per forward pass).
    assert all(len(r) > 0 for r in placement.blocks)
    assert split.model.hf_device_map == placement.device_map
    disk = placement.devices.index("disk")
    for i in placement.blocks[disk]:
        assert {p.device.type for p in split.parts.blocks[i].parameters()} == {"meta"}
    assert split.device == split.input_device == torch.device("cpu")
    assert split.parts.head.unembed.device.type == "cpu"

    # Every statistic, every site, with the last 3 blocks replayed across the device boundary.
    spec = LensSpec(
        sites=sites, decoder_blocks=3, lookahead=[2, 3], token_sets={"kw": ["def", "class", 5]}
    )
    expected, got = lens_statistics(whole, spec), lens_statistics(split, spec)
    for f in fields(expected):
        a, b = getattr(expected, f.name), getattr(got, f.name)
        if a is None:
            assert b is None, f.name
        elif a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5, equal_nan=True, msg=f.name)
        else:
            assert torch.equal(a, b), f.name


def test_a_model_that_does_not_fit_is_refused_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(
            tiny_model_dir("llama"),
            device="cpu",
            devices=[DeviceBudget("disk", 40_000), DeviceBudget("cpu", 40_000)],
            offload_folder=tmp_path / "offload",
        )
    message = str(info.value)
    assert "the model's weights take 185 KiB in float32" in message
    assert "may hold 78.1 KiB" in message and "at least 5 devices" in message
    assert not (tmp_path / "offload").exists()  # refused before a weight was read


def test_a_split_on_another_kind_of_device_than_model_device_is_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="model.device is 'cuda', but the model is to be"):
        load_model(tiny_model_dir("llama"), device="cuda", devices=[DeviceBudget("cpu", 2**30)])


def test_a_disk_device_needs_a_folder(tiny_model_dir):
    devices = [DeviceBudget("disk", 2**30), DeviceBudget("cpu", 2**30)]
    with pytest.raises(ModelLoadError, match="'disk' device needs an offload_folder"):
        load_model(tiny_model_dir("llama"), device="cpu", devices=devices)


def test_a_split_the_lens_cannot_read_is_refused_after_the_load(tiny_loaded_model):
    """``check_placement``: the blocks the lens hooks must be the split's, and the head's tensors
    must sit on the head's device (here a placement that says otherwise, by construction)."""
    loaded = tiny_loaded_model("llama")
    planned = plan_device_map(model_layout(loaded.model), [DeviceBudget("cpu", 2**30)])
    check_placement(loaded.model, loaded.parts, planned)  # the true one passes
    reversed_blocks = dataclasses.replace(planned, block_names=planned.block_names[::-1])
    with pytest.raises(ModelLoadError, match="the lens reads the blocks model.layers.0"):
        check_placement(loaded.model, loaded.parts, reversed_blocks)
    elsewhere = dataclasses.replace(planned, head_device="meta")
    with pytest.raises(ModelLoadError, match="final norm weight is on cpu, not on meta"):
        check_placement(loaded.model, loaded.parts, elsewhere)
