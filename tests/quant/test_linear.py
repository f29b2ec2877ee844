"""EetqLinear: construction, forward against plain float math, input gradients, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eetq_lora import EetqLinear, dequantize_weight, quantize_weight

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error budget of the compute dtype against an fp64 reference of the same int8 weight.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_layer(in_features=64, out_features=48, bias=True):
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, EetqLinear.from_linear(linear)


def reference_output(layer: EetqLinear, x: torch.Tensor) -> torch.Tensor:
    weight = layer.dequantize(torch.float32).double()
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), weight, bias)


def test_constructor_shapes_and_dtypes():
    layer = EetqLinear(32, 16)
    assert (layer.in_features, layer.out_features) == (32, 16)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (32, 16)
    assert not layer.weight.requires_grad
    assert layer.weight_scales.dtype == torch.float16 and layer.weight_scales.shape == (16,)
    assert layer.bias.dtype == torch.float16 and layer.bias.shape == (16,)
    assert EetqLinear(32, 16, bias=False).bias is None
    assert EetqLinear(32, 16, dtype=torch.bfloat16).bias.dtype == torch.bfloat16


def test_constructor_rejects_bad_sizes_and_dtype():
    with pytest.raises(ValueError, match="positive"):
        EetqLinear(0, 4)
    with pytest.raises(TypeError, match="float dtype"):
        EetqLinear(4, 4, dtype=torch.int8)


def test_state_dict_holds_exactly_weight_scales_bias():
    _, layer = make_layer()
    assert set(layer.state_dict()) == {"weight", "weight_scales", "bias"}
    _, no_bias = make_layer(bias=False)
    assert set(no_bias.state_dict()) == {"weight", "weight_scales"}


@pytest.mark.parametrize("source_dtype", FLOAT_DTYPES)
def test_from_linear_quantizes_with_quantize_weight(source_dtype):
    linear = nn.Linear(40, 24).to(source_dtype)
    layer = EetqLinear.from_linear(linear)
    q, scales = quantize_weight(linear.weight)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scales, scales)
    assert torch.equal(layer.bias, linear.bias.detach().half())
    assert torch.equal(layer.dequantize(), dequantize_weight(q, scales))


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        EetqLinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("leading", [(5,), (2, 7), (2, 3, 4), ()])
def test_forward_matches_float_math(dtype, leading):
    _, layer = make_layer()
    x = torch.randn(*leading, 64).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*leading, 48)
    expected = reference_output(layer, x)
    torch.testing.assert_close(y.double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_input_gradient_matches_float_math(dtype, mode):
    _, layer = make_layer()
    getattr(layer, mode)()
    x = torch.randn(3, 5, 64).to(dtype).requires_grad_()
    upstream = torch.randn(3, 5, 48).to(dtype)
    (layer(x) * upstream).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (reference_output(layer, x64) * upstream.double()).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert layer.weight.grad is None and layer.bias.grad is None


def test_backward_keeps_no_dequantized_weight_alive():
    _, layer = make_layer(256, 192)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert x.grad is not None
    weight_elements = 256 * 192
    assert all(not (dtype.is_floating_point and numel >= weight_elements) for dtype, numel in saved), saved


def test_trainable_bias_gets_its_gradient():
    _, layer = make_layer()
    layer.bias.requires_grad_(True)
    layer(torch.randn(2, 64)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((48,), 2.0, dtype=torch.float16))


def test_autocast_runs_in_the_autocast_dtype_like_nn_linear():
    linear, layer = make_layer()
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_linear = linear(x)
    assert y.dtype == y_linear.dtype == torch.bfloat16
    expected = reference_output(layer, x.bfloat16())
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


def test_dtype_cast_of_model_keeps_scales_fp16():
    _, layer = make_layer()
    scales = layer.weight_scales.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_scales.dtype == torch.float16 and torch.equal(layer.weight_scales, scales)
    assert layer.weight.dtype == torch.int8 and layer.bias.dtype == torch.bfloat16


def test_wrong_last_dimension_is_a_clear_error():
    _, layer = make_layer()
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(2, 63))


@pytest.mark.parametrize("bad", [torch.ones(2, 64, dtype=torch.int64), torch.ones(2, 64, dtype=torch.float64)])
def test_non_float_input_is_a_clear_error(bad):
    _, layer = make_layer()
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        layer(bad)
