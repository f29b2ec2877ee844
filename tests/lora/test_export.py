"""export_merged: merged float and requantized checkpoints, and a destination that is complete or absent."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import eetq_lora
from eetq_lora import EetqLinear, export_merged
from tests.helpers import tiny_llama, token_batch
from tests.lora.helpers import quantized_with_two_adapters, randomize_lora


@pytest.fixture(scope="module")
def peft_model():
    model = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), LoraConfig(r=4, target_modules=["q_proj"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def folder_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_file_is_refused_and_untouched(peft_model, tmp_path, overwrite):
    target = tmp_path / "merged"
    target.write_text("a file the user owns")
    with pytest.raises(FileExistsError, match="is an existing file, not a folder"):
        export_merged(peft_model, target, overwrite=overwrite)
    assert target.is_file() and target.read_text() == "a file the user owns"
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_a_symlink_to_a_file_is_refused(peft_model, tmp_path):
    (tmp_path / "real.txt").write_text("keep")
    (tmp_path / "merged").symlink_to(tmp_path / "real.txt")
    with pytest.raises(FileExistsError, match="is an existing file"):
        export_merged(peft_model, tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged").is_symlink() and (tmp_path / "real.txt").read_text() == "keep"


def test_a_file_that_appears_during_the_merge_is_refused(peft_model, tmp_path, monkeypatch):
    target = tmp_path / "merged"
    real_quantize = eetq_lora.lora.export.quantize_model

    def quantize_then_create(*args, **kwargs):
        target.write_text("appeared meanwhile")
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(eetq_lora.lora.export, "quantize_model", quantize_then_create)
    with pytest.raises(FileExistsError, match="is an existing file"):
        export_merged(peft_model, target, requantize=True, overwrite=True)
    assert target.read_text() == "appeared meanwhile"


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
def test_a_failed_save_leaves_the_previous_export_whole(peft_model, tmp_path, monkeypatch, failure):
    target = tmp_path / "merged"
    export_merged(peft_model, target, dtype=torch.float32)
    before = folder_bytes(target)
    model_class = type(peft_model.get_base_model())
    real_save = model_class.save_pretrained

    def save_half_then_fail(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        os.remove(os.path.join(folder, "model.safetensors"))  # as if the weights never made it
        raise failure

    monkeypatch.setattr(model_class, "save_pretrained", save_half_then_fail)
    with pytest.raises(type(failure)):
        export_merged(peft_model, target, dtype=torch.bfloat16, overwrite=True)
    with pytest.raises(type(failure)):
        export_merged(peft_model, tmp_path / "new", dtype=torch.bfloat16)
    assert folder_bytes(target) == before and sorted(os.listdir(tmp_path)) == ["merged"]


def test_overwrite_publishes_a_complete_folder(peft_model, tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    export_merged(peft_model, target, dtype=torch.float32, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(token_batch()).logits, peft_model(input_ids=token_batch()).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.bool])
def test_a_dtype_that_is_not_a_checkpoint_float_is_refused(peft_model, tmp_path, dtype):
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        export_merged(peft_model, tmp_path / "merged", dtype=dtype)
    assert not (tmp_path / "merged").exists()


def test_only_a_peft_model_can_be_exported(tmp_path):
    with pytest.raises(TypeError, match="export_merged expects a peft.PeftModel, got LlamaForCausalLM"):
        export_merged(eetq_lora.quantize_model(tiny_llama()), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def randomized(model):
    """``model`` with every LoRA tensor (biases included) drawn at random, so none is zero."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def test_a_lora_bias_is_added_to_the_base_bias(tmp_path):
    base = eetq_lora.quantize_model(tiny_llama(attention_bias=True))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    model = randomized(eetq_lora.get_peft_model(base, config))
    export_merged(model, tmp_path / "merged", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    layer = model.get_base_model().model.layers[1].self_attn.q_proj
    expected_bias = layer.base_layer.bias.float() + layer.lora_B["default"].bias * 2.0  # scaling: alpha / r
    expected_weight = (
        layer.base_layer.dequantize(torch.float32)
        + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.0
    )
    merged = loaded.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(merged.bias, expected_bias, rtol=0, atol=0)
    torch.testing.assert_close(merged.weight, expected_weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(token_batch()).logits, model(input_ids=token_batch()).logits, rtol=1e-5, atol=1e-5
        )


def test_a_lora_bias_on_a_layer_without_bias_is_refused(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)
    model = randomized(eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), config))
    with pytest.raises(ValueError) as error:
        export_merged(model, tmp_path / "merged")
    assert str(error.value) == (
        "model.layers.0.self_attn.q_proj: adapter 'default' has lora_bias=True but the base layer has no bias, so "
        "the merged layer cannot be written as an nn.Linear; train without lora_bias to export"
    )
    assert not (tmp_path / "merged").exists()


def test_a_trained_copy_from_modules_to_save_is_exported_and_a_disabled_adapter_is_not(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = randomized(eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), config))
    wrapper = model.get_base_model().lm_head
    original_head = wrapper.original_module.weight.detach().clone()
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    export_merged(model, tmp_path / "adapted", dtype=torch.float32)
    with model.disable_adapter():
        export_merged(model, tmp_path / "base", dtype=torch.float32)
    adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "adapted")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(adapted.lm_head.weight, original_head + 1.0)
    assert torch.equal(base.lm_head.weight, original_head)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, q_proj.base_layer.dequantize(torch.float32))
    assert not torch.equal(
        adapted.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    )


# --- merged checkpoints --------------------------------------------------------------------------


def test_export_merged_float_checkpoint_loads_in_stock_transformers(tmp_path):
    model = quantized_with_two_adapters()
    report = export_merged(model, tmp_path / "merged", dtype=torch.float32)
    assert report.merged_layers == 14 and not report.requantized
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, EetqLinear) for m in loaded.modules())
    assert getattr(loaded.config, "quantization_config", None) is None
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("requantize", [False, True])
def test_adapters_on_layers_kept_in_float_are_merged_too(tmp_path, requantize):
    # all-linear also wraps the nn.Linear layers quantization left alone, in PEFT's own LoRA layer.
    base = eetq_lora.quantize_model(tiny_llama(), modules_to_not_convert=["down_proj"])
    model = eetq_lora.get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model, seed=3)
    model.eval()
    float_layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(float_layer.get_base_layer(), torch.nn.Linear)
    expected_weight = float_layer.get_base_layer().weight + float_layer.get_delta_weight("default")
    report = export_merged(model, tmp_path / "merged", dtype=torch.float32, requantize=requantize)
    eetq_layers = sum(isinstance(m, EetqLinear) for m in model.modules())
    assert report.merged_layers == eetq_layers + 2  # and the two float down_proj layers
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    exported = loaded.model.layers[0].mlp.down_proj
    assert type(exported) is torch.nn.Linear
    torch.testing.assert_close(exported.weight, expected_weight, rtol=1e-6, atol=1e-6)
    if not requantize:
        ids = token_batch()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # The model in memory is unchanged: its float layer is not merged.
    assert not float_layer.merged


def test_export_merged_defaults_to_bfloat16(tmp_path):
    report = export_merged(quantized_with_two_adapters(), tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert report.path == tmp_path / "merged"
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_export_refuses_an_existing_folder_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = quantized_with_two_adapters()
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged(model, existing)
    assert (existing / "keep.txt").read_text() == "user data"

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model.get_base_model()), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_merged(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_export_merged_requantized_is_an_eetq_checkpoint_with_its_error_reported(tmp_path):
    from eetq_lora import quantize_weight

    model = quantized_with_two_adapters()
    float_report = export_merged(model, tmp_path / "float", dtype=torch.float32)
    report = export_merged(model, tmp_path / "int8", requantize=True)
    assert report.requantized and float_report.overall_error is None
    assert len(report.layer_errors) == 14 and 0 < report.overall_error < 0.02
    float_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert loaded.config.quantization_config.quant_method == "eetq"
    name = "model.layers.0.self_attn.q_proj"
    layer = loaded.get_submodule(name)
    assert isinstance(layer, EetqLinear)
    merged_weight = float_merged.get_submodule(name).weight
    q, scales = quantize_weight(merged_weight)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scales, scales)
    relative = (layer.dequantize(torch.float32) - merged_weight).norm() / merged_weight.norm()
    assert abs(relative.item() - report.layer_errors[name]) < 1e-6
