"""EetqLinear's state dict speaks EETQ's checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import eetq_lora.quant.linear as linear_module
from eetq_lora.format.layout import LAYOUTS, pack_weight
from eetq_lora.quant import EetqLinear, set_checkpoint_layout
from tests.format.helpers import sm70_by_steps, sm75_by_gather, stored_bytes


def quantized(in_features=128, out_features=192, bias=True, seed=0, **kwargs) -> EetqLinear:
    torch.manual_seed(seed)
    layer = EetqLinear.from_linear(nn.Linear(in_features, out_features, bias=bias))
    for name, value in kwargs.items():
        setattr(layer, name, value)
    return layer


def fresh_like(layer: EetqLinear, **kwargs) -> EetqLinear:
    return EetqLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, **kwargs)


def assert_same_layer(a: EetqLinear, b: EetqLinear) -> None:
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight_scales, b.weight_scales) and b.weight_scales.dtype == torch.float16
    assert (a.bias is None and b.bias is None) or torch.equal(a.bias, b.bias)


def test_default_layout_is_sm75_bytes_from_the_gather_formula():
    layer = quantized(128, 192)
    plain = layer.weight.clone()
    state = layer.state_dict()
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (128, 192)
    assert stored_bytes(state["weight"]) == sm75_by_gather(plain)
    assert state["weight_scales"].dtype == torch.float16 and state["weight_scales"].shape == (192,)
    assert torch.equal(state["weight_scales"], layer.weight_scales)
    assert torch.equal(state["bias"], layer.bias)
    # The layer itself keeps the plain matrix.
    assert torch.equal(layer.weight, plain)
    assert layer.checkpoint_layout == "sm75"


def test_sm70_layout_bytes():
    layer = quantized(64, 128, checkpoint_layout="sm70")
    assert stored_bytes(layer.state_dict()["weight"]) == sm70_by_steps(layer.weight)


def test_plain_layout_hands_out_the_weight_itself():
    layer = quantized(64, 128, checkpoint_layout="plain")
    state = layer.state_dict()
    assert state["weight"].data_ptr() == layer.weight.data_ptr()


def test_loading_stock_eetq_bytes_gives_the_plain_matrix():
    q = torch.randint(-128, 128, (128, 64), dtype=torch.int16).to(torch.int8)
    stock = torch.tensor(sm75_by_gather(q), dtype=torch.uint8).view(torch.int8).reshape(128, 64)
    layer = EetqLinear(128, 64, bias=False)
    layer.load_state_dict({"weight": stock, "weight_scales": torch.ones(64, dtype=torch.float16)})
    assert torch.equal(layer.weight, q)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_through_load_state_dict(layout, bias):
    layer = quantized(128, 192, bias=bias, checkpoint_layout=layout)
    loaded = fresh_like(layer, checkpoint_layout=layout)
    loaded.load_state_dict(layer.state_dict())
    assert_same_layer(layer, loaded)
    x = torch.randn(3, 128)
    assert torch.equal(loaded(x), layer(x))


def test_constructor_layout_and_attribute_and_bad_value():
    assert EetqLinear(64, 64).checkpoint_layout == "sm75"
    assert EetqLinear(64, 64, checkpoint_layout="sm70").checkpoint_layout == "sm70"
    layer = EetqLinear(64, 64)
    layer.checkpoint_layout = "plain"
    assert layer.checkpoint_layout == "plain"
    with pytest.raises(ValueError, match="unknown EETQ checkpoint layout 'sm80'"):
        EetqLinear(64, 64, checkpoint_layout="sm80")
    with pytest.raises(ValueError, match="unknown EETQ checkpoint layout"):
        layer.checkpoint_layout = "SM75"
    assert layer.checkpoint_layout == "plain"


def test_set_checkpoint_layout_on_a_model():
    model = nn.Sequential(quantized(64, 128), nn.ReLU(), nn.Sequential(quantized(128, 64)), nn.Linear(64, 4))
    assert set_checkpoint_layout(model, "sm70") == 2
    assert [m.checkpoint_layout for m in model.modules() if isinstance(m, EetqLinear)] == ["sm70", "sm70"]
    state = model.state_dict()
    assert torch.equal(state["0.weight"], pack_weight(model[0].weight, "sm70"))
    assert torch.equal(state["2.0.weight"], pack_weight(model[2][0].weight, "sm70"))
    with pytest.raises(ValueError, match="unknown EETQ checkpoint layout"):
        set_checkpoint_layout(model, "fast")
    assert set_checkpoint_layout(nn.Linear(2, 2), "plain") == 0


@pytest.mark.parametrize("shape", [(100, 64), (64, 30), (576, 100), (7, 5)])
def test_shapes_eetq_cannot_hold_fall_back_to_plain(shape):
    for layout in LAYOUTS:
        layer = quantized(*shape, checkpoint_layout=layout)
        state = layer.state_dict()  # never raises for a trainable shape
        assert state["weight"].data_ptr() == layer.weight.data_ptr()
        loaded = fresh_like(layer, checkpoint_layout=layout)
        loaded.load_state_dict(state)
        assert_same_layer(layer, loaded)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_save_and_load_weights_only(tmp_path, layout):
    model = nn.Sequential(
        quantized(64, 128, seed=1), nn.GELU(), quantized(128, 64, bias=False, seed=2), quantized(64, 40)
    )
    set_checkpoint_layout(model, layout)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["0.weight"].dtype == torch.int8 and state["0.weight"].shape == (64, 128)
    rebuilt = nn.Sequential(EetqLinear(64, 128), nn.GELU(), EetqLinear(128, 64, bias=False), EetqLinear(64, 40))
    set_checkpoint_layout(rebuilt, layout)
    rebuilt.load_state_dict(state)
    for a, b in ((model[0], rebuilt[0]), (model[2], rebuilt[2]), (model[3], rebuilt[3])):
        assert_same_layer(a, b)


def test_safetensors_round_trip(tmp_path):
    model = nn.Sequential(quantized(128, 64, seed=3), quantized(64, 128, seed=4))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    state = load_file(tmp_path / "model.safetensors")
    assert stored_bytes(state["0.weight"]) == sm75_by_gather(model[0].weight)
    rebuilt = nn.Sequential(EetqLinear(128, 64), EetqLinear(64, 128))
    rebuilt.load_state_dict(state)
    assert_same_layer(model[0], rebuilt[0])
    assert_same_layer(model[1], rebuilt[1])


def test_load_with_assign_and_into_meta_layer():
    layer = quantized(64, 128)
    with torch.device("meta"):
        target = EetqLinear(64, 128)
    target.load_state_dict(layer.state_dict(), assign=True)
    assert target.weight.device.type == "cpu" and not target.weight.requires_grad
    assert_same_layer(layer, target)


def test_meta_layer_state_dict_is_not_packed():
    with torch.device("meta"):
        layer = EetqLinear(128, 128)
    state = layer.state_dict()
    assert state["weight"].device.type == "meta" and state["weight"].shape == (128, 128)


def test_load_leaves_callers_dict_untouched():
    layer = quantized(64, 64)
    state = layer.state_dict()
    stored = state["weight"]
    fresh_like(layer).load_state_dict(state)
    assert state["weight"] is stored


class Aliased(nn.Module):
    """Like PEFT's LoRA wrapper: the same base layer registered under two names."""

    def __init__(self, base: EetqLinear) -> None:
        super().__init__()
        self.base_layer = base
        self.quant_linear_module = base


def test_alias_is_packed_once_per_state_dict_call(monkeypatch):
    calls = []

    def counting_pack(*args, **kwargs):
        calls.append(1)
        return pack_weight(*args, **kwargs)

    monkeypatch.setattr(linear_module, "pack_weight", counting_pack)
    wrapper = Aliased(quantized(64, 128))
    state = wrapper.state_dict()
    assert len(calls) == 1
    assert state["base_layer.weight"] is state["quant_linear_module.weight"]
    assert torch.equal(state["base_layer.weight"], pack_weight(wrapper.base_layer.weight, "sm75"))
    wrapper.state_dict()
    assert len(calls) == 2  # a new call packs again: nothing is cached between calls


def test_state_dict_follows_weight_changes_between_calls():
    layer = quantized(64, 64)
    wrapper = Aliased(layer)
    first = wrapper.state_dict()["base_layer.weight"].clone()
    with torch.no_grad():
        layer.weight.data[0, 0] = -layer.weight[0, 0] - 1
    second = wrapper.state_dict()
    assert not torch.equal(first, second["base_layer.weight"])
    assert torch.equal(second["quant_linear_module.weight"], pack_weight(layer.weight, "sm75"))
    # Reached under another name (the layer on its own) while the earlier packing is still alive
    # in `second`, after an edit that does not bump the version counter.
    with torch.no_grad():
        layer.weight.data[1, 1] = -layer.weight[1, 1] - 1
    assert torch.equal(layer.state_dict()["weight"], pack_weight(layer.weight, "sm75"))


def test_aliased_round_trip():
    source = Aliased(quantized(128, 64, seed=5))
    target = Aliased(EetqLinear(128, 64))
    target.load_state_dict(source.state_dict())
    assert_same_layer(source.base_layer, target.base_layer)


def test_two_distinct_layers_are_not_confused():
    model = nn.Sequential(quantized(64, 64, seed=6), quantized(64, 64, seed=7))
    state = model.state_dict()
    assert torch.equal(state["0.weight"], pack_weight(model[0].weight))
    assert torch.equal(state["1.weight"], pack_weight(model[1].weight))


# ---- errors ---------------------------------------------------------------------------------


def load_error(layer: EetqLinear, state: dict, strict: bool = True) -> str:
    with pytest.raises(RuntimeError) as info:
        layer.load_state_dict(state, strict=strict)
    return str(info.value)


def test_float_weight_is_a_clear_error():
    linear = nn.Linear(64, 128)
    message = load_error(
        EetqLinear(64, 128), linear.state_dict() | {"weight_scales": torch.ones(128, dtype=torch.float16)}
    )
    assert "'weight'" in message
    assert "expected an int8 tensor of shape [in_features, out_features] = [64, 128]" in message
    assert "got torch.float32 of shape [128, 64]" in message
    assert "quantized first" in message


def test_transposed_int8_weight_is_a_clear_error():
    state = {"weight": torch.zeros(128, 64, dtype=torch.int8), "weight_scales": torch.ones(128, dtype=torch.float16)}
    message = load_error(EetqLinear(64, 128, bias=False), state)
    assert "got torch.int8 of shape [128, 64]" in message and "transposed" in message


@pytest.mark.parametrize(
    "scales, got",
    [
        (torch.ones(128, dtype=torch.float32), "got torch.float32 of shape [128]"),
        (torch.ones(64, dtype=torch.float16), "got torch.float16 of shape [64]"),
        (torch.ones(1, 128, dtype=torch.float16), "got torch.float16 of shape [1, 128]"),
    ],
)
def test_bad_scales_are_a_clear_error(scales, got):
    state = {"layer.weight": torch.zeros(64, 128, dtype=torch.int8), "layer.weight_scales": scales}
    model = nn.Module()
    model.layer = EetqLinear(64, 128, bias=False)
    message = load_error(model, state)
    assert "'layer.weight_scales': expected a float16 tensor of shape [out_features] = [128]" in message
    assert got in message


@pytest.mark.parametrize("strict", [True, False])
def test_weight_without_scales_is_an_error_even_when_not_strict(strict):
    layer = quantized(64, 128)
    state = layer.state_dict()
    del state["weight_scales"]
    message = load_error(fresh_like(layer), state, strict=strict)
    assert "'weight_scales' is missing but 'weight' is present" in message


def test_scales_without_weight_is_an_error():
    layer = quantized(64, 128)
    state = layer.state_dict()
    del state["weight"]
    assert "'weight' is missing but 'weight_scales' is present" in load_error(fresh_like(layer), state, strict=False)


def test_errors_do_not_change_the_layer():
    layer = quantized(64, 128)
    before = layer.weight.clone()
    load_error(layer, {"weight": torch.zeros(64, 128), "weight_scales": torch.ones(128, dtype=torch.float16)})
    assert torch.equal(layer.weight, before)


def test_missing_and_unexpected_keys_keep_torch_semantics():
    layer = quantized(64, 128)
    target = fresh_like(layer)
    result = target.load_state_dict({"bias": layer.bias}, strict=False)
    assert sorted(result.missing_keys) == ["weight", "weight_scales"]
    message = load_error(target, {"bias": layer.bias})
    assert "Missing key(s)" in message and "weight_scales" in message
    message = load_error(target, layer.state_dict() | {"weight_extra": torch.zeros(1)})
    assert "Unexpected key(s)" in message and "weight_extra" in message
    result = target.load_state_dict(layer.state_dict() | {"weight_extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["weight_extra"]
    assert_same_layer(layer, target)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scales_are_refused_on_load(bad):
    state = quantized(64, 64).state_dict()
    state["weight_scales"] = state["weight_scales"].clone()
    state["weight_scales"][7] = bad
    target = EetqLinear(64, 64)
    with pytest.raises(RuntimeError, match="1 of the 64 scales are inf or NaN"):
        target.load_state_dict(state)
    assert torch.equal(target.weight_scales, torch.zeros(64, dtype=torch.float16))
