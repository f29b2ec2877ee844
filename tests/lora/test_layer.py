"""EetqLoraLinear, sentence by sentence from the seed spec (shared/seed/eetq_lora_linear.md)."""

import inspect
import math

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from eetq_lora import EetqLinear, EetqLoraLinear


def base_layer(in_features=32, out_features=24, bias=True):
    return EetqLinear.from_linear(nn.Linear(in_features, out_features, bias=bias))


def trained_layer(**kwargs):
    """A layer whose B is not zero, so the adapter actually changes the output."""
    settings = dict(r=4, lora_alpha=8)
    settings.update(kwargs)
    layer = EetqLoraLinear(base_layer(), "default", **settings)
    for adapter in layer.lora_B:
        nn.init.normal_(layer.lora_B[adapter].weight, std=0.5)
    return layer


def plain_float_lora(layer, x, adapter="default"):
    """base output + lora_B(lora_A(dropout(x))) * scaling, in float64."""
    a = layer.lora_A[adapter].weight.double()
    b = layer.lora_B[adapter].weight.double()
    lora = (x.double() @ a.t()) @ b.t()
    if layer.lora_B[adapter].bias is not None:
        lora = lora + layer.lora_B[adapter].bias.double()
    return layer.base_layer(x).double() + lora * layer.scaling[adapter]


# --- class and constructor ---------------------------------------------------------------


def test_is_a_torch_module_and_a_peft_lora_layer():
    assert issubclass(EetqLoraLinear, nn.Module) and issubclass(EetqLoraLinear, LoraLayer)


def test_constructor_defaults_are_the_specs():
    params = inspect.signature(EetqLoraLinear.__init__).parameters
    expected = dict(
        r=0, lora_alpha=1, lora_dropout=0.0, init_lora_weights=True, use_rslora=False, use_dora=False, lora_bias=False
    )
    assert {name: params[name].default for name in expected} == expected
    assert list(params)[1:3] == ["base_layer", "adapter_name"]


def test_default_rank_zero_is_rejected_as_peft_does():
    with pytest.raises(ValueError, match="positive integer"):
        EetqLoraLinear(base_layer(), "default")


def test_keyword_form_builds_the_adapter():
    layer = EetqLoraLinear(base_layer(), "a", r=4, lora_alpha=16, lora_dropout=0.1)
    assert layer.lora_A["a"].weight.shape == (4, 32) and layer.lora_B["a"].weight.shape == (24, 4)
    assert layer.lora_A["a"].bias is None and layer.lora_B["a"].bias is None
    assert isinstance(layer.lora_dropout["a"], nn.Dropout) and layer.lora_dropout["a"].p == 0.1
    assert layer.scaling["a"] == 16 / 4
    assert layer.active_adapters == ["a"]
    assert isinstance(EetqLoraLinear(base_layer(), "b", r=4).lora_dropout["b"], nn.Identity)


def test_config_form_as_current_peft_passes_it():
    config = LoraConfig(r=8, lora_alpha=4, lora_dropout=0.2, use_rslora=True, lora_bias=True)
    layer = EetqLoraLinear(base_layer(), "x", config=config, r=8, lora_alpha=4)
    assert layer.scaling["x"] == 4 / math.sqrt(8)
    assert layer.lora_dropout["x"].p == 0.2 and layer.lora_B["x"].bias is not None


def test_config_and_conflicting_keywords_are_refused():
    with pytest.raises(TypeError, match="lora_dropout"):
        EetqLoraLinear(base_layer(), "x", config=LoraConfig(r=4), r=4, lora_dropout=0.5)


def test_rslora_scaling():
    layer = EetqLoraLinear(base_layer(), "a", r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling["a"] == 8 / math.sqrt(16)


def test_lora_bias_adds_a_zero_initialised_bias_to_b():
    layer = EetqLoraLinear(base_layer(), "a", r=4, lora_bias=True)
    assert torch.equal(layer.lora_B["a"].bias, torch.zeros(24))


def test_init_true_is_kaiming_a_and_zero_b():
    layer = EetqLoraLinear(base_layer(), "a", r=4)
    assert torch.equal(layer.lora_B["a"].weight, torch.zeros(24, 4))
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_A["a"].weight.abs().max() <= bound and layer.lora_A["a"].weight.abs().max() > bound / 2


def test_init_gaussian_and_false():
    torch.manual_seed(0)
    gaussian = EetqLoraLinear(base_layer(256, 64), "a", r=8, init_lora_weights="gaussian")
    assert abs(gaussian.lora_A["a"].weight.std().item() - 1 / 8) < 0.01
    assert torch.equal(gaussian.lora_B["a"].weight, torch.zeros(64, 8))
    untouched = EetqLoraLinear(base_layer(), "a", r=4, init_lora_weights=False)
    assert untouched.lora_B["a"].weight.abs().sum() > 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda", "orthogonal"])
def test_inits_that_need_the_float_base_weight_fail_clearly(init):
    config = LoraConfig(r=4)
    # Set after construction: LoraConfig's own checks for some inits need optional packages (scipy).
    config.init_lora_weights = init
    with pytest.raises(ValueError, match="frozen int8") as info:
        EetqLoraLinear(base_layer(), "a", config=config, r=4)
    assert "gaussian" in str(info.value)


def test_a_positional_rank_in_the_config_place_is_a_clear_type_error():
    # PEFT's signature puts config third; the seed lists r there. A rank given positionally must
    # not surface as an AttributeError from inside PEFT.
    with pytest.raises(TypeError, match=r"third argument is config, a LoraConfig.*r=8, lora_alpha=16"):
        EetqLoraLinear(base_layer(), "a", 4, 8)


def test_adapters_stay_float32_on_an_int8_base():
    layer = EetqLoraLinear(base_layer(), "a", r=4)
    assert layer.lora_A["a"].weight.dtype == torch.float32 and layer.lora_B["a"].weight.dtype == torch.float32


# --- DoRA, merge, unmerge, alias, repr ----------------------------------------------------


def test_dora_is_refused_with_value_error():
    with pytest.raises(ValueError, match="DoRA"):
        EetqLoraLinear(base_layer(), "a", r=4, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        EetqLoraLinear(base_layer(), "a", config=LoraConfig(r=4, use_dora=True), r=4)


def test_dora_is_refused_for_a_second_adapter_too():
    layer = EetqLoraLinear(base_layer(), "a", r=4)
    with pytest.raises(ValueError, match="DoRA"):
        layer.update_layer("b", 4, lora_alpha=8, config=LoraConfig(r=4, use_dora=True))
    assert "b" not in layer.lora_A


def test_merge_raises_attribute_error_with_the_exact_message():
    layer = trained_layer()
    for call in (lambda: layer.merge(), lambda: layer.merge(safe_merge=True, adapter_names=["default"])):
        with pytest.raises(AttributeError) as info:
            call()
        assert str(info.value) == "Merging LoRA layers is not supported for Eetq layers."


def test_unmerge_raises_attribute_error_with_the_exact_message():
    with pytest.raises(AttributeError) as info:
        trained_layer().unmerge()
    assert str(info.value) == "Unmerging LoRA layers is not supported for Eetq layers."


def test_quant_linear_module_is_the_base_layer():
    base = base_layer()
    layer = EetqLoraLinear(base, "a", r=4)
    assert layer.quant_linear_module is layer.base_layer is base
    assert layer.get_base_layer() is base


def test_repr_is_prefixed_with_lora():
    text = repr(EetqLoraLinear(base_layer(), "a", r=4))
    assert text.startswith("lora.EetqLoraLinear(")
    assert "EetqLinear(in_features=32, out_features=24" in text


# --- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("leading", [(6,), (2, 5)])
def test_forward_equals_plain_float_math_fp32(leading):
    layer = trained_layer()
    x = torch.randn(*leading, 32)
    torch.testing.assert_close(layer(x).double(), plain_float_lora(layer, x), rtol=1e-5, atol=1e-5)


def test_forward_executes_the_base_layer_first_and_adds_every_active_adapter():
    layer = trained_layer()
    layer.update_layer("second", 2, lora_alpha=2, config=LoraConfig(r=2, init_lora_weights=False))
    layer.set_adapter(["default", "second"])
    x = torch.randn(3, 32)
    expected = plain_float_lora(layer, x) + plain_float_lora(layer, x, "second") - layer.base_layer(x).double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_inactive_or_unknown_adapters_are_skipped():
    layer = trained_layer()
    layer.update_layer("idle", 2, lora_alpha=2, config=LoraConfig(r=2, init_lora_weights=False))
    layer.set_adapter("default")  # "idle" exists but is not active
    layer._active_adapter = ["default", "not-there"]  # an active name without weights is skipped
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x).double(), plain_float_lora(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_without_autocast_is_cast_to_the_adapter_dtype_and_back(dtype):
    layer = trained_layer()
    x = torch.randn(4, 32).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    # The spec's order: x cast to lora_A's dtype (fp32), output cast to the result dtype, then scaled.
    lora = layer.lora_B["default"](layer.lora_A["default"](x.float())).to(dtype) * layer.scaling["default"]
    assert torch.equal(y, layer.base_layer(x) + lora)


def test_under_autocast_no_conversion_is_made():
    layer = trained_layer()
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        lora = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        base = layer.base_layer(x)
    assert lora.dtype == torch.bfloat16 and base.dtype == torch.bfloat16
    assert torch.equal(y, base + lora)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("autocast_on", [False, True])
def test_the_autocast_check_works_for_a_model_on_the_meta_device(autocast_on):
    # torch.is_autocast_enabled("meta") raises; shape inference on meta (as stock PEFT allows) must not.
    layer = EetqLoraLinear(EetqLinear(32, 24, bias=False, device="meta"), "a", r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on):
        out = layer(torch.randn(2, 5, 32, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 5, 24)


def test_dropout_applies_to_the_adapter_input_only():
    layer = trained_layer(lora_dropout=0.5)
    layer.train()
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout["default"](x)
    lora = layer.lora_B["default"](layer.lora_A["default"](dropped)) * layer.scaling["default"]
    torch.testing.assert_close(y, layer.base_layer(x) + lora)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), plain_float_lora(layer, x), rtol=1e-5, atol=1e-5)


def test_disabled_adapters_return_the_base_output_unchanged():
    layer = trained_layer()
    x = torch.randn(5, 32)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_adapters(True)
    assert not torch.equal(layer(x), layer.base_layer(x))


def test_gradients_reach_only_the_adapter():
    layer = trained_layer()
    x = torch.randn(5, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    assert x.grad is not None
    assert layer.base_layer.weight.grad is None


# --- beyond the seed: delta weight and mixed-adapter batches -----------------------------------


def test_get_delta_weight_is_b_at_a_times_scaling():
    layer = trained_layer()
    expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = torch.randn(3, 32)
    merged = layer.base_layer.dequantize(torch.float32) + layer.get_delta_weight("default")
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, merged, layer.base_layer.bias.float()))


def test_mixed_adapter_batch_equals_each_sample_alone():
    layer = trained_layer()
    layer.update_layer("other", 2, lora_alpha=4, config=LoraConfig(r=2, init_lora_weights=False))
    x = torch.randn(4, 7, 32)
    names = ["other", "__base__", "default", "other"]
    mixed = layer(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            expected = layer.base_layer(x[i : i + 1])
        else:
            layer.set_adapter(name)
            expected = layer(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-6, atol=1e-6)


def test_mixed_adapter_batch_length_mismatch_is_a_clear_error():
    layer = trained_layer()
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(torch.randn(3, 32), adapter_names=["default"])
