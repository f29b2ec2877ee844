"""A tiny Llama on CPU: quantize, attach LoRA through PEFT, train, save, reload, compare with PEFT on floats."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model
from safetensors.torch import load_file

import eetq_lora
from eetq_lora import EetqLinear, EetqLoraLinear
from tests.helpers import dequantized_twin, tiny_llama, token_batch


def train(model, ids, steps=20, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quantized tiny Llama with an r=8 adapter on q_proj/v_proj after 20 AdamW steps, saved."""
    torch.manual_seed(0)
    model = eetq_lora.quantize_model(tiny_llama(seed=0))
    peft_model = eetq_lora.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ids = token_batch()
    losses = train(peft_model, ids)
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return peft_model, losses, path, ids


def test_result_is_a_peft_model_with_eetq_lora_layers(trained):
    peft_model, *_ = trained
    assert type(peft_model) is PeftModel or isinstance(peft_model, PeftModel)
    wrapped = [name for name, m in peft_model.named_modules() if isinstance(m, EetqLoraLinear)]
    assert len(wrapped) == 4 and all(name.endswith(("q_proj", "v_proj")) for name in wrapped)


def test_training_makes_the_loss_fall(trained):
    _, losses, *_ = trained
    # 20 steps of r=8 on q/v of a random 2-layer model: a clear, steady fall (4.87 -> 4.35 here).
    assert losses[-1] < 0.95 * losses[0]
    assert max(losses[-5:]) < min(losses[:5])


def test_only_lora_parameters_train_and_receive_gradients():
    model = eetq_lora.quantize_model(tiny_llama())
    peft_model = eetq_lora.get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ids = token_batch()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    for name, param in peft_model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert param.requires_grad == is_lora, name
        assert (param.grad is not None) == is_lora, name


def test_saved_adapter_is_a_plain_peft_adapter(trained):
    _, _, path, _ = trained
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    tensors = load_file(path / "adapter_model.safetensors")
    assert len(tensors) == 8
    assert all(key.startswith("base_model.model.model.layers.") for key in tensors)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_reload_into_a_fresh_quantized_copy_gives_identical_logits(trained):
    peft_model, _, path, ids = trained
    fresh = eetq_lora.load_adapter(eetq_lora.quantize_model(tiny_llama(seed=0)), path)
    assert isinstance(fresh, PeftModel)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_reload_trainable(trained):
    _, _, path, _ = trained
    fresh = eetq_lora.load_adapter(eetq_lora.quantize_model(tiny_llama(seed=0)), path, is_trainable=True)
    trainable = [name for name, p in fresh.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all("lora_" in name for name in trainable)


def test_plain_peft_on_the_float_model_differs_only_by_quantization_error(trained):
    peft_model, _, path, ids = trained
    float_base = PeftModel.from_pretrained(tiny_llama(seed=0), path)
    # Same adapter on the dequantized weights: the only difference left is float rounding.
    dequantized = dequantized_twin(peft_model.get_base_model())
    dequantized_peft = PeftModel.from_pretrained(dequantized, path)
    with torch.no_grad():
        ours = peft_model(input_ids=ids).logits
        on_float = float_base(input_ids=ids).logits
        on_dequantized = dequantized_peft(input_ids=ids).logits
        with peft_model.disable_adapter():
            ours_base = peft_model(input_ids=ids).logits
        float_plain = tiny_llama(seed=0)(input_ids=ids).logits
    torch.testing.assert_close(ours, on_dequantized, rtol=1e-4, atol=1e-4)
    adapter_gap = (ours - on_float).norm() / on_float.norm()
    base_gap = (ours_base - float_plain).norm() / float_plain.norm()
    assert adapter_gap < 0.05
    assert adapter_gap < 2 * base_gap  # the adapter adds no error of its own beyond quantization


def test_adapter_trained_with_plain_peft_on_floats_loads_here(tmp_path):
    float_model = peft_get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, target_modules=["k_proj", "o_proj"]))
    train(float_model, token_batch(), steps=3)
    float_model.save_pretrained(tmp_path)
    ours = eetq_lora.load_adapter(eetq_lora.quantize_model(tiny_llama(seed=0)), tmp_path)
    layer = ours.get_base_model().model.layers[1].self_attn.o_proj
    assert isinstance(layer, EetqLoraLinear)
    expected = float_model.get_base_model().model.layers[1].self_attn.o_proj.lora_B["default"].weight
    assert torch.equal(layer.lora_B["default"].weight, expected)


def test_all_linear_reaches_every_eetq_layer_but_the_head():
    model = eetq_lora.quantize_model(tiny_llama())
    peft_model = eetq_lora.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = [name for name, m in peft_model.named_modules() if isinstance(m, EetqLoraLinear)]
    assert len(wrapped) == 14
    assert not isinstance(peft_model.get_base_model().lm_head, EetqLoraLinear)
    wrapped_bases = {id(m.base_layer) for m in peft_model.modules() if isinstance(m, EetqLoraLinear)}
    assert wrapped_bases == {id(m) for m in peft_model.modules() if isinstance(m, EetqLinear)}


def test_get_peft_model_does_not_change_the_callers_config():
    config = LoraConfig(r=4, target_modules="all-linear")
    eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), config)
    assert config.target_modules == "all-linear" and config._custom_modules is None


def test_second_adapter_on_other_modules_and_loading_into_a_peft_model(tmp_path):
    model = eetq_lora.quantize_model(tiny_llama())
    peft_model = eetq_lora.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    eetq_lora.add_adapter(peft_model, "mlp", LoraConfig(r=4, target_modules=["up_proj"], init_lora_weights=False))
    assert isinstance(peft_model.get_base_model().model.layers[0].mlp.up_proj, EetqLoraLinear)
    peft_model.save_pretrained(tmp_path, selected_adapters=["mlp"])
    other = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), LoraConfig(r=4, target_modules=["q_proj"]))
    eetq_lora.load_adapter(other, tmp_path / "mlp", adapter_name="mlp")
    ids = token_batch()
    peft_model.set_adapter("mlp")
    other.set_adapter("mlp")
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, other(input_ids=ids).logits)


def test_load_adapter_from_a_folder_without_adapter_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        eetq_lora.load_adapter(eetq_lora.quantize_model(tiny_llama()), tmp_path)


def test_all_linear_second_adapter_on_a_peft_model_targets_the_same_layers():
    model = eetq_lora.get_peft_model(
        eetq_lora.quantize_model(tiny_llama()), LoraConfig(r=4, target_modules="all-linear")
    )
    eetq_lora.add_adapter(model, "second", LoraConfig(r=2, target_modules="all-linear"))
    assert set(model.peft_config["second"].target_modules) == set(model.peft_config["default"].target_modules)
    layers = [m for m in model.modules() if isinstance(m, EetqLoraLinear)]
    assert len(layers) == 14 and all(set(m.lora_A) == {"default", "second"} for m in layers)


def test_training_leaves_the_int8_base_bit_identical():
    model = eetq_lora.quantize_model(tiny_llama())
    before = {
        name: (m.weight.clone(), m.weight_scales.clone())
        for name, m in model.named_modules()
        if isinstance(m, EetqLinear)
    }
    peft_model = eetq_lora.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    train(peft_model, token_batch(), steps=3)
    after = peft_model.get_base_model()
    for name, module in after.named_modules():
        if isinstance(module, EetqLoraLinear):
            base = module.get_base_layer()
            assert torch.equal(base.weight, before[name][0]) and torch.equal(base.weight_scales, before[name][1])
            assert base.weight.dtype == torch.int8
