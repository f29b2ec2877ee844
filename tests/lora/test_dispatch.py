"""dispatch_eetq and is_eetq_available, from the seed spec."""

import importlib.util

import pytest
import torch
from peft import LoraConfig
from torch import nn
from transformers.integrations.eetq import EetqLinear as TransformersEetqLinear

from eetq_lora import EetqLinear, EetqLoraLinear, dispatch_eetq, is_eetq_available


def eetq_layer(bias=True):
    return EetqLinear.from_linear(nn.Linear(32, 16, bias=bias))


def test_plain_linear_is_not_dispatched():
    assert dispatch_eetq(nn.Linear(8, 8), "default", r=4) is None
    assert dispatch_eetq(nn.Linear(8, 8), "default", config=LoraConfig(r=4), r=4) is None


def test_eetq_layer_gets_an_eetq_lora_linear_and_weight_and_bias_are_set():
    target = eetq_layer()
    weight, bias = target.weight, target.bias
    new = dispatch_eetq(target, "default", config=LoraConfig(r=4), r=4, lora_alpha=8)
    assert isinstance(new, EetqLoraLinear) and new.base_layer is target
    assert target.weight is weight and target.bias is bias
    assert new.weight is weight and new.bias is bias


def test_weight_is_set_on_a_bias_free_layer_and_bias_stays_none():
    target = eetq_layer(bias=False)
    new = dispatch_eetq(target, "default", r=4)
    assert new.weight is target.weight and target.bias is None


def test_dispatch_takes_the_spec_keywords_without_config():
    new = dispatch_eetq(eetq_layer(), "x", r=2, lora_alpha=4, lora_dropout=0.0, use_rslora=True)
    assert new.scaling["x"] == 4 / 2**0.5


def test_target_that_is_already_a_tuner_layer_is_unwrapped():
    base = eetq_layer()
    wrapped = EetqLoraLinear(base, "first", r=4)
    new = dispatch_eetq(wrapped, "second", r=2)
    assert isinstance(new, EetqLoraLinear)
    assert new.get_base_layer() is base
    # the read-only tuner-layer properties still resolve to the base layer's tensors
    assert wrapped.weight is base.weight and wrapped.bias is base.bias


def test_transformers_eetq_linear_is_recognised():
    target = TransformersEetqLinear(64, 32, bias=True)
    new = dispatch_eetq(target, "default", r=4)
    assert isinstance(new, EetqLoraLinear)
    assert (new.in_features, new.out_features) == (64, 32)
    assert new.weight is target.weight


def test_is_eetq_available_reports_the_eetq_package():
    assert is_eetq_available() == (importlib.util.find_spec("eetq") is not None)


@pytest.mark.skipif(not is_eetq_available(), reason="the eetq CUDA package is not installed")
def test_upstream_eetq_linear_is_recognised():
    from eetq import EetqLinear as UpstreamEetqLinear

    from eetq_lora.integrations.eetq_layers import eetq_layer_classes

    assert UpstreamEetqLinear in eetq_layer_classes()


def test_forward_through_dispatched_layer_matches_base_plus_lora():
    new = dispatch_eetq(eetq_layer(), "default", r=4, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(3, 32)
    lora = new.lora_B["default"](new.lora_A["default"](x)) * new.scaling["default"]
    torch.testing.assert_close(new(x), new.base_layer(x).float() + lora)


def test_weight_is_referenced_directly_with_no_separate_qweight():
    target = eetq_layer()
    new = dispatch_eetq(target, "default", r=4)
    assert not hasattr(target, "qweight") and not hasattr(new, "qweight")
    assert new.weight.dtype == torch.int8
