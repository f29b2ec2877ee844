"""EetqLinear's checkpoint layout under PEFT: adapter saves stay cheap and never fail, full saves stay EETQ."""

from __future__ import annotations

import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import eetq_lora.quant.linear as linear_module
from eetq_lora import EetqLinear, get_peft_model, mark_eetq_quantized, quantize_model
from eetq_lora.format.layout import pack_weight, resolve_layout
from tests.helpers import PROJECTIONS, tiny_llama, token_batch


def peft_model(**overrides):
    model = quantize_model(tiny_llama(**overrides))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS))


def test_adapter_save_packs_each_base_layer_once_and_handles_odd_shapes(tmp_path, monkeypatch):
    # hidden 64 with 2 of 4 heads for k/v: k_proj and v_proj are 64 -> 32, which EETQ's layouts cannot hold.
    model = peft_model()
    layers = [m for m in model.modules() if isinstance(m, EetqLinear)]
    assert any(layer.out_features % 64 for layer in layers)
    packed = []

    def counting_pack(q, layout="sm75", name=None):
        packed.append(name)
        return pack_weight(q, layout, name)

    monkeypatch.setattr(linear_module, "pack_weight", counting_pack)
    model.save_pretrained(tmp_path)
    fitting = [layer for layer in layers if resolve_layout("sm75", layer.in_features, layer.out_features) == "sm75"]
    assert len(packed) == len(fitting)  # once per layer, not once per alias; odd shapes are not packed at all
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)


def test_full_state_dict_of_a_peft_model_is_in_eetq_layout():
    model = peft_model(hidden_size=128, intermediate_size=256)
    state = model.state_dict()
    base_keys = [key for key in state if key.endswith("base_layer.weight")]
    assert base_keys
    for key in base_keys:
        layer = model.get_submodule(key.removesuffix(".weight"))
        assert isinstance(layer, EetqLinear)
        assert torch.equal(state[key], pack_weight(layer.weight, "sm75")), key
        alias = key.replace("base_layer.weight", "quant_linear_module.weight")
        if alias in state:
            assert state[alias] is state[key]


def test_quantized_checkpoint_then_lora(tmp_path):
    # A saved EETQ checkpoint loads through transformers and takes LoRA adapters like a fresh quantization.
    model = quantize_model(tiny_llama(hidden_size=128, intermediate_size=256))
    mark_eetq_quantized(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=True)
    a, b = get_peft_model(model, config), get_peft_model(loaded, config)
    wrapped = sorted(name for name, _ in b.named_modules() if name.endswith(".lora_A"))
    assert len(wrapped) == 14 and wrapped == sorted(name for name, _ in a.named_modules() if name.endswith(".lora_A"))
    with torch.no_grad():
        assert torch.equal(a(token_batch()).logits, b(token_batch()).logits)
