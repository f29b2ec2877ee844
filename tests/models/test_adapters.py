"""Saved adapters: reading their folders, agreeing on one base model, attaching them to one quantized base."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import eetq_lora
from eetq_lora import EetqLoraLinear
from eetq_lora.errors import UserError
from eetq_lora.models.adapters import (
    AdapterInfo,
    attach_adapters,
    base_model_spec,
    check_adapter_weights,
    load_for_inference,
    read_adapter,
    refused_pickle,
    setting,
    using,
)
from tests.helpers import tiny_llama


def save_adapter(base, folder: Path, seed: int) -> Path:
    """A LoRA adapter of ``base`` with random (non-zero) B matrices, saved by PEFT."""
    peft_model = eetq_lora.get_peft_model(eetq_lora.quantize_model(base), LoraConfig(r=4, target_modules=["q_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """An adapter of the tiny model; PEFT records the tiny model's folder as its base model."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return save_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", seed=3)


def copy_of(adapter: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(adapter, tmp_path / name))


def quantized_base(tiny_model: Path):
    return eetq_lora.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))


def info(label: str, settings: dict | None = None, base_model_path: str | None = None) -> AdapterInfo:
    return AdapterInfo(Path(label), label, "adapter_0", settings, base_model_path)


# --- reading a folder ----------------------------------------------------------------------------


def test_read_adapter_reads_the_base_model_and_names_the_adapter_by_position(adapter, tiny_model):
    found = read_adapter(adapter, index=2)
    assert found == AdapterInfo(adapter, str(adapter), "adapter_2", None, str(tiny_model))


def test_read_adapter_reads_the_finetune_settings(adapter, tmp_path, monkeypatch):
    folder = copy_of(adapter, tmp_path)
    settings = {"model": "/models/base", "dtype": "bfloat16", "max_seq_len": 32}
    (folder / "run_config.json").write_text(json.dumps({"settings": settings, "other": 1}))
    monkeypatch.setenv("HOME", str(tmp_path))
    found = read_adapter("~/copy")
    assert found.path == folder and found.label == "~/copy" and found.name == "adapter_0"
    assert found.settings == settings


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda folder: shutil.rmtree(folder),
            "adapter folder {path} does not exist; pass the --out folder of a finetune run",
        ),
        (
            lambda folder: (folder / "adapter_config.json").unlink(),
            "{path} is not an adapter folder (no adapter_config.json); pass the --out folder of a finetune run",
        ),
        (
            lambda folder: (folder / "adapter_config.json").write_text('{"peft_type": "IA3"}'),
            "{path} holds a IA3 adapter; eetq-lora loads LoRA adapters only",
        ),
        (
            lambda folder: (folder / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}'),
            "{path}/adapter_config.json is not UTF-8 text; copy the adapter folder again",
        ),
    ],
    ids=["missing", "no-config", "not-lora", "not-utf8"],
)
def test_folders_that_are_not_lora_adapters_are_refused(adapter, tmp_path, make, message):
    folder = copy_of(adapter, tmp_path)
    make(folder)
    with pytest.raises(UserError) as error:
        read_adapter(folder)
    assert str(error.value) == message.format(path=folder)


def test_peft_type_is_matched_without_case(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "lora"}))
    assert read_adapter(folder).name == "adapter_0"


# --- weight files --------------------------------------------------------------------------------


def as_pickle(folder: Path, extra: dict | None = None) -> Path:
    """Replace the safetensors weights by a torch.save pickle of the same tensors (plus ``extra``)."""
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({**tensors, **(extra or {})}, folder / "adapter_model.bin")
    return folder / "adapter_model.bin"


def test_a_tensor_only_pickle_is_accepted(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    as_pickle(folder)
    check_adapter_weights(folder)


def test_a_pickle_that_holds_objects_is_refused_without_running_it(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    weights = as_pickle(folder, {"extra": argparse.Namespace(note="not a tensor")})
    with pytest.raises(UserError) as error:
        check_adapter_weights(folder)
    assert str(error.value) == (
        f"{weights} is a pickle that holds more than tensors (argparse.Namespace), which could run code, so it was "
        "not loaded; eetq-lora loads only safetensors files and tensor-only pickles: save the adapter as "
        "adapter_model.safetensors with save_pretrained() where you trust the file"
    )


def test_the_safetensors_file_is_the_one_checked_when_both_exist(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / "adapter_model.bin").write_bytes(b"not a pickle at all")
    check_adapter_weights(folder)


def test_a_folder_without_weights_is_incomplete(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError) as error:
        check_adapter_weights(folder)
    assert str(error.value) == (
        f"{folder} has adapter_config.json but no adapter weights (adapter_model.safetensors): the folder is "
        "incomplete; copy the whole finetune --out folder again"
    )


def test_refused_pickle_names_the_refused_global_and_never_suggests_weights_only_false(tmp_path):
    file = tmp_path / "adapter_model.bin"
    refused = pickle.UnpicklingError(
        "Weights only load failed.\nPlease file an issue with the following so that we can make `weights_only=True` "
        "compatible with your use case: WeightsUnpickler error: Unsupported global: GLOBAL os.system was not an "
        "allowed global by default. Please use `torch.serialization.add_safe_globals([system])` or ..."
    )
    message = str(refused_pickle(file, refused))
    assert message.startswith(f"{file} is a pickle that holds more than tensors (os.system), which could run code")
    assert "weights_only" not in message and "\n" not in message
    corrupt = str(refused_pickle(file, pickle.UnpicklingError("invalid load key, 'x'.")))
    assert corrupt == (
        f"{file} is a pickle that cannot be read as plain tensors (truncated or corrupt); "
        "eetq-lora loads only safetensors files and tensor-only pickles: copy the adapter folder again"
    )


# --- agreeing on a base model --------------------------------------------------------------------


def test_the_explicit_model_wins():
    adapters = [info("a", {"model": "/m/one"}), info("b", {"model": "/m/two"})]
    assert base_model_spec(adapters, "/m/mine") == "/m/mine"


def test_adapters_trained_by_eetq_lora_name_their_model():
    assert base_model_spec([info("a", {"model": "/m/one"}), info("b", {"model": "/m/one"})], None) == "/m/one"
    assert base_model_spec([info("a", {"model": None}), info("b", {})], None) is None  # the built-in model


def test_other_adapters_name_their_base_folder_when_it_exists(tmp_path):
    (tmp_path / "base").mkdir()
    assert base_model_spec([info("a", None, str(tmp_path / "base"))], None) == str((tmp_path / "base").resolve())
    assert base_model_spec([info("a", None, str(tmp_path / "gone"))], None) is None
    assert base_model_spec([info("a", None, "org/hub-model"), info("b", {"model": "/m/one"})], None) == "/m/one"
    assert base_model_spec([], None) is None


def test_adapters_of_different_base_models_are_refused(tmp_path):
    (tmp_path / "base").mkdir()
    adapters = [info("a", {"model": "/m/one"}), info("b", {"model": None}), info("c", None, str(tmp_path / "base"))]
    with pytest.raises(UserError) as error:
        base_model_spec(adapters, None)
    assert str(error.value) == (
        f"the adapters were trained on different base models (a: /m/one; b: built-in; c: {tmp_path / 'base'}); "
        "compare adapters of one base model, or pass --model"
    )


def test_setting_is_the_first_recorded_value():
    adapters = [info("a"), info("b", {"dtype": None}), info("c", {"dtype": "float16"}), info("d", {"dtype": "x"})]
    assert setting(adapters, "dtype", "auto") == "float16"
    assert setting(adapters, "max_seq_len", 512) == 512
    assert setting([], "dtype", "auto") == "auto"


# --- attaching -----------------------------------------------------------------------------------


def active_lora_layers(model) -> list[bool]:
    return [not m.disable_adapters for m in model.modules() if isinstance(m, EetqLoraLinear)]


def test_every_adapter_is_attached_and_one_at_a_time_is_used(adapter, tiny_model, tmp_path):
    second = save_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tmp_path / "second", seed=4
    )
    adapters = [read_adapter(adapter, 0), read_adapter(second, 1)]
    model = attach_adapters(quantized_base(tiny_model), adapters)
    assert not model.training and sorted(model.peft_config) == ["adapter_0", "adapter_1"]
    for found in adapters:
        saved = load_file(found.path / "adapter_model.safetensors")
        state = model.state_dict()
        for key, tensor in saved.items():
            assert torch.equal(state[key.replace(".weight", f".{found.name}.weight")], tensor), key
    with using(model, adapters[1]) as used:
        assert used is model and model.active_adapter == "adapter_1"
    with using(model, None):
        assert not any(active_lora_layers(model))
    assert all(active_lora_layers(model))
    bare = quantized_base(tiny_model)
    with using(bare, None) as used:
        assert used is bare


def test_refused_pickle_while_attaching_is_one_line(tiny_model, adapter, tmp_path):
    """The pickle check in attach_adapters, for adapters that did not come through read_adapter."""
    folder = copy_of(adapter, tmp_path)
    as_pickle(folder, {"extra": argparse.Namespace(note="not a tensor")})
    base = quantized_base(tiny_model)
    found = AdapterInfo(folder, str(folder), "adapter_0", None, None)
    with pytest.raises(UserError, match=r"adapter_model\.bin is a pickle that holds more than tensors") as caught:
        attach_adapters(base, [found])
    assert "\n" not in str(caught.value)


def test_an_adapter_of_another_architecture_is_a_user_error(adapter, tmp_path):
    other_base = eetq_lora.quantize_model(tiny_llama(hidden_size=128, intermediate_size=256))
    found = read_adapter(adapter)
    with pytest.raises(UserError) as error:
        attach_adapters(other_base, [found])
    message = str(error.value)
    assert message.startswith(f"could not load adapter {adapter} onto this base model: ") and "\n" not in message


def test_load_for_inference_loads_the_recorded_base_once_with_the_recorded_dtype(adapter, tiny_model, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / "run_config.json").write_text(json.dumps({"settings": {"model": str(tiny_model), "dtype": "bfloat16"}}))
    threads = torch.get_num_threads()
    try:
        loaded = load_for_inference([str(folder)], None, None, "cpu", 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert loaded.loaded.source.folder == tiny_model.resolve() and loaded.loaded.dtype == torch.bfloat16
    assert [found.name for found in loaded.adapters] == ["adapter_0"]
    assert list(loaded.model.peft_config) == ["adapter_0"]
    assert loaded.model.get_base_model().lm_head.weight.dtype == torch.bfloat16


def test_load_for_inference_without_adapters_is_the_quantized_base(tiny_model):
    loaded = load_for_inference([], str(tiny_model), "float32", "cpu", None)
    assert loaded.adapters == [] and loaded.model is loaded.loaded.model
    assert loaded.loaded.dtype == torch.float32
