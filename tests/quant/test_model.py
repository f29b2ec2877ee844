"""quantize_model: which layers it converts, what it frees, what it logs."""

import gc
import logging
import weakref

import pytest
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
    quantize_model(model, modules_to_not_convert=("lm_head", "model.layers.1.mlp", "layers.0.self_attn.q_proj"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, EetqLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, EetqLinear)
    mlp = model.model.layers[1].mlp
    assert all(type(linear) is nn.Linear for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert is_skipped("model.lm_head", ["lm_head"]) and not is_skipped("model.layers.11.mlp", ["model.layers.1"])


def test_saved_quantized_model_reloads_with_the_same_layers_quantized(tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantize_model(tiny_llama(), modules_to_not_convert=("lm_head", "model.layers.1.mlp"))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, EetqLinear))}
    assert kinds == {name: type(m) for name, m in reloaded.named_modules() if isinstance(m, (nn.Linear, EetqLinear))}
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_multihead_attention_projection_stays_float():
    model = nn.Sequential(nn.Linear(8, 8))
    model.add_module("attention", nn.MultiheadAttention(8, 2))
    quantize_model(model)
    assert isinstance(model[0], EetqLinear)
    assert type(model.attention.out_proj) is not EetqLinear


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


def test_a_bad_weight_anywhere_leaves_the_model_unconverted():
    model = tiny_llama()
    last = model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        last.weight[3, 5] = float("nan")
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.down_proj'.*inf or NaN"):
        quantize_model(model)
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert not any(isinstance(module, EetqLinear) for module in model.modules())


def test_meta_weights_are_refused_before_any_conversion():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="meta device"):
        quantize_model(model)
    assert all(type(module) is nn.Linear for module in model)
