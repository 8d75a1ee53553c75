"""Loading model directories: safety checks, dtype/device choice, the load-time self-check."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from codelens.engine.errors import ModelLoadError, SelfCheckError, UnsupportedArchitectureError
from codelens.engine.model import loading
from codelens.engine.model.loading import (
    SELF_CHECK_TOLERANCE,
    load_model,
    probe_batch,
    resolve_device,
    resolve_dtype,
)
from codelens.engine.zoo.tiny_models import build_tiny_tokenizer


@pytest.fixture
def llama_copy(tiny_model_dir, tmp_path: Path) -> Path:
    """A private copy of the tiny llama directory, free to damage."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "llama"))


# --- every family loads from disk and passes the self-check ---------------------------------------


def test_load_fp32(tiny_family: str, tiny_loaded_model) -> None:
    loaded = tiny_loaded_model(tiny_family, "float32")
    assert loaded.family == tiny_family
    assert loaded.dtype == torch.float32 == loaded.model.dtype
    assert loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert 0.0 <= loaded.self_check_max_abs_err <= SELF_CHECK_TOLERANCE[torch.float32] * 10


def test_loaded_model_computes_the_reference_logits(
    tiny_family: str, tiny_model_dir, tiny_loaded_model
) -> None:
    """Whichever attention implementation transformers picked for us, the model we load gives the
    logits of a float64 eager-attention reference built from the same files, on a padded batch."""
    loaded = tiny_loaded_model(tiny_family, "float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(tiny_family),
        dtype=torch.float64,
        attn_implementation="eager",
        local_files_only=True,
    ).eval()
    ids, mask = probe_batch(loaded.tokenizer, loaded.parts.head.vocab_size)
    with torch.inference_mode():
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real].double(), want[real], atol=1e-4, rtol=1e-4)


def test_load_bf16_passes_self_check(tiny_family: str, tiny_loaded_model) -> None:
    loaded = tiny_loaded_model(tiny_family, "bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.parts.head.unembed.dtype == torch.bfloat16
    # Rounding makes bf16 differ from the fp32 head, but well inside the tolerance (<= 2e-2 rel).
    assert 0.0 < loaded.self_check_max_abs_err < 0.1


def test_right_padded_batch_matches_unpadded_runs(tiny_family: str, tiny_loaded_model) -> None:
    """The chosen attention implementation gives pad-independent logits at real positions."""
    loaded = tiny_loaded_model(tiny_family)
    ids, mask = probe_batch(loaded.tokenizer, loaded.parts.head.vocab_size)
    assert (mask.sum(1) < ids.shape[1]).any()  # the probe really is padded
    with torch.inference_mode():
        batched = loaded.model(input_ids=ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = loaded.model(input_ids=ids[row : row + 1, :n]).logits[0]
            torch.testing.assert_close(batched[row, :n], alone, atol=1e-4, rtol=1e-4)
            assert torch.isfinite(batched[row]).all()


# --- a head that does not match the model fails the load ------------------------------------------


def _load_with_broken_head(monkeypatch, path: Path, breaker) -> None:
    real_model_parts = loading.model_parts

    def broken_model_parts(model):
        parts = real_model_parts(model)
        return dataclasses.replace(parts, head=breaker(parts.head))

    monkeypatch.setattr(loading, "model_parts", broken_model_parts)
    load_model(path, device="cpu")


def test_missing_softcap_fails_self_check(monkeypatch, tiny_model_dir) -> None:
    with pytest.raises(SelfCheckError) as info:
        _load_with_broken_head(
            monkeypatch,
            tiny_model_dir("gemma2"),
            lambda head: dataclasses.replace(head, softcap=None),
        )
    message = str(info.value)
    assert "Gemma2ForCausalLM" in message and "gemma2" in message
    assert "engine/model/surgery.py" in message and "soft-cap" in message


def test_scaled_norm_weight_fails_self_check(monkeypatch, tiny_model_dir) -> None:
    def scale_norm(head):
        return dataclasses.replace(
            head, norm=dataclasses.replace(head.norm, weight=head.norm.weight * 1.01)
        )

    with pytest.raises(SelfCheckError, match=r"llama.*differs from the model's logits by up to"):
        _load_with_broken_head(monkeypatch, tiny_model_dir("llama"), scale_norm)


def test_self_check_can_be_skipped(tiny_model_dir) -> None:
    loaded = load_model(tiny_model_dir("llama"), device="cpu", self_check=False)
    assert loaded.self_check_max_abs_err != loaded.self_check_max_abs_err  # NaN: not measured


# --- bad model directories ------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist.*never downloaded"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("codellama/CodeLlama-7b-hf")  # a hub id is not a directory


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "model.safetensors")


def test_missing_config(llama_copy: Path) -> None:
    (llama_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(llama_copy)


def test_config_without_weights(llama_copy: Path) -> None:
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights: expected model.safetensors"):
        load_model(llama_copy)


def test_pickle_weights_refused_unless_allowed(llama_copy: Path) -> None:
    state = load_file(llama_copy / "model.safetensors")
    torch.save(state, llama_copy / "pytorch_model.bin")
    (llama_copy / "model.safetensors").unlink()

    with pytest.raises(ModelLoadError) as info:
        load_model(llama_copy)
    assert "pytorch_model.bin" in str(info.value)
    assert "model.allow_pickle: true" in str(info.value)

    loaded = load_model(llama_copy, device="cpu", allow_pickle=True)
    assert loaded.self_check_max_abs_err <= 1e-4
    torch.testing.assert_close(loaded.parts.head.unembed, state["lm_head.weight"])


def test_missing_tokenizer_files(llama_copy: Path) -> None:
    (llama_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(llama_copy)
    message = str(info.value)
    assert "no tokenizer" in message
    assert "tokenizer.json" in message and "tokenizer.model" in message
    assert "vocab.json+merges.txt" in message
    # It lists what the directory does hold (transformers versions differ in what they save).
    found = message.rpartition("found ")[2].rstrip(".").split(", ")
    assert "tokenizer_config.json" in found and "tokenizer.json" not in found


def test_remote_code_refused_unless_trusted(llama_copy: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model.trust_remote_code: true"):
        load_model(llama_copy)


def test_checkpoint_missing_a_weight(llama_copy: Path) -> None:
    """transformers would initialise a missing lm_head randomly; the loader refuses instead."""
    state = load_file(llama_copy / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, llama_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing: lm_head.weight"):
        load_model(llama_copy)


def test_unknown_model_type(llama_copy: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "not_a_real_model"
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not_a_real_model"):
        load_model(llama_copy)


def test_unsupported_architecture_from_disk(tmp_path: Path) -> None:
    config = transformers.BertConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        is_decoder=True,
    )
    transformers.BertLMHeadModel(config).save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="BertLMHeadModel: its base model"):
        load_model(tmp_path, device="cpu")


def test_load_sets_offline_mode(monkeypatch, tiny_model_dir) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    load_model(tiny_model_dir("llama"), device="cpu", self_check=False)
    assert os.environ["HF_HUB_OFFLINE"] == "1" == os.environ["TRANSFORMERS_OFFLINE"]


# --- dtype and device -----------------------------------------------------------------------------


def test_resolve_dtype(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # CPU: "auto" is fp32 whatever the checkpoint says.
    assert resolve_dtype("auto", {"dtype": "bfloat16"}, cpu) is torch.float32
    assert resolve_dtype("bfloat16", {}, cpu) is torch.bfloat16
    assert resolve_dtype("float16", {}, cpu) is torch.float16
    assert resolve_dtype(torch.float32, {}, cpu) is torch.float32
    # CUDA: the config's dtype (either key), bf16 if absent, fp16 where bf16 is unsupported.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", {"dtype": "float16"}, cuda) is torch.float16
    assert resolve_dtype("auto", {"torch_dtype": "float32"}, cuda) is torch.float32
    assert resolve_dtype("auto", {}, cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", {"dtype": "bfloat16"}, cuda) is torch.float16
    with pytest.raises(ModelLoadError, match="model.dtype 'fp8'"):
        resolve_dtype("fp8", {}, cpu)


def test_resolve_device(monkeypatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")
