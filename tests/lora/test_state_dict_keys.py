"""EetqLoraLinear state dicts: each base tensor once (quant_linear_module is an alias, not a second submodule)."""

import torch
from peft import LoraConfig
from peft.utils import get_base_model_state_dict, set_base_model_state_dict

import eetq_lora
from eetq_lora import EetqLinear, EetqLoraLinear
from tests.helpers import PROJECTIONS, tiny_llama, token_batch


def lora_model(seed=0):
    model = eetq_lora.quantize_model(tiny_llama(seed=seed, hidden_size=128, intermediate_size=256))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    return eetq_lora.get_peft_model(model, config).eval()


def test_every_base_tensor_appears_once():
    model = lora_model()
    state = model.state_dict()
    assert not any("quant_linear_module" in key for key in state)
    layers = [m for m in model.modules() if isinstance(m, EetqLoraLinear)]
    assert len([key for key in state if key.endswith("base_layer.weight")]) == len(layers) == 14
    assert all(layer.quant_linear_module is layer.base_layer for layer in layers)
    assert not any(name.endswith("quant_linear_module") for name, _ in model.named_modules())


def test_peft_base_model_state_dict_helpers_round_trip():
    source, target = lora_model(seed=0), lora_model(seed=3)
    base_state = get_base_model_state_dict(source)
    # The original model's own keys: the quantized model before PEFT wrapped it.
    plain_keys = set(eetq_lora.quantize_model(tiny_llama(hidden_size=128, intermediate_size=256)).state_dict())
    assert set(base_state) == plain_keys
    result = set_base_model_state_dict(target, base_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    target.load_state_dict({k: v for k, v in source.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        assert torch.equal(source(token_batch()).logits, target(token_batch()).logits)


def test_state_dicts_that_name_the_alias_still_load():
    # PEFT's own EETQ layer registers the alias as a submodule, so its full state dicts hold every
    # base tensor twice; they load strictly, and an alias-only entry counts as the base layer's.
    source, target = lora_model(seed=0), lora_model(seed=3)
    state = source.state_dict()
    doubled = dict(state)
    for key, value in state.items():
        if ".base_layer." in key:
            doubled[key.replace(".base_layer.", ".quant_linear_module.")] = value
    target.load_state_dict(doubled, strict=True)
    with torch.no_grad():
        assert torch.equal(source(token_batch()).logits, target(token_batch()).logits)

    alias_only = {key.replace(".base_layer.", ".quant_linear_module."): value for key, value in state.items()}
    fresh = lora_model(seed=5)
    fresh.load_state_dict(alias_only, strict=True)
    for name, module in fresh.named_modules():
        if isinstance(module, EetqLinear):
            assert torch.equal(module.weight, source.get_submodule(name).weight), name
