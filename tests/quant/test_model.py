"""quantize_model: which layers it converts, what it frees, what it logs."""

import gc
import logging
import weakref

import torch
from torch import nn

from eetq_lora import EetqLinear, quantize_model, quantize_weight
from eetq_lora.quant.model import is_skipped
from tests.helpers import tiny_llama


def test_converts_every_linear_but_lm_head_in_place():
    model = tiny_llama()
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in linear_names}
    returned = quantize_model(model)
    assert returned is model
    for name in linear_names:
        module = model.get_submodule(name)
        if name == "lm_head":
            assert type(module) is nn.Linear
            continue
        assert isinstance(module, EetqLinear)
        q, scales = quantize_weight(originals[name])
        assert torch.equal(module.weight, q) and torch.equal(module.weight_scales, scales)


def test_modules_to_not_convert_matches_suffixes_and_subtrees():
    model = tiny_llama()
    quantize_model(model, modules_to_not_convert=("lm_head", "mlp", "layers.0.self_attn.q_proj"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, EetqLinear)
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in model.model.layers)
    assert is_skipped("model.lm_head", ["lm_head"]) and not is_skipped("model.lm_head_x", ["lm_head"])


def test_float_weights_are_released():
    model = tiny_llama()
    weight_ref = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    quantize_model(model)
    gc.collect()
    assert weight_ref() is None


def test_logs_count_and_bytes_saved(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="eetq_lora"):
        quantize_model(model)
    message = caplog.records[-1].getMessage()
    # 2 layers x (4 attention + 3 MLP projections)
    assert "converted 14 linear layers" in message and "saved" in message


def test_quantized_model_runs_close_to_float_model():
    reference = tiny_llama()
    model = quantize_model(tiny_llama())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    relative = (got - expected).norm() / expected.norm()
    assert relative < 0.05
