"""quantize_weight / dequantize_weight against EETQ's quantization rules, computed independently element by element."""

import math
import warnings

import numpy as np
import pytest
import torch

from eetq_lora import dequantize_weight, quantize_weight


def reference_quantize(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Element by element from EETQ's rules: fp32 absmax/128, fp32 division, C round, clamp, NaN -> 127."""
    w = weight.float().numpy()
    out_features, in_features = w.shape
    q = np.zeros((in_features, out_features), dtype=np.int8)
    scales = np.zeros(out_features, dtype=np.float16)
    for n in range(out_features):
        scale = np.float32(np.abs(w[n]).max()) * np.float32(1.0 / 128.0)
        scales[n] = np.float16(scale)
        for k in range(in_features):
            with np.errstate(invalid="ignore"):
                ratio = float(np.float32(w[n, k]) / scale)  # exact in a Python float
            if math.isnan(ratio):
                value = 127
            else:
                value = math.copysign(math.floor(abs(ratio) + 0.5), ratio)
                value = int(min(max(value, -128), 127))
            q[k, n] = value
    return q, scales


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33), (64, 48)])
def test_fp16_matches_reference_formula(shape):
    weight = (torch.randn(shape) * 0.05).half()
    q, scales = quantize_weight(weight)
    ref_q, ref_scales = reference_quantize(weight)
    assert q.dtype == torch.int8 and q.shape == (shape[1], shape[0])
    assert scales.dtype == torch.float16 and scales.shape == (shape[0],)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(scales.numpy().view(np.uint16), ref_scales.view(np.uint16))


def test_hand_computed_rows():
    # Row 0: absmax 1 -> scale 1/128; +1 -> 128 clipped to 127, -1 -> -128, 0.5 -> 64.
    # Row 1: absmax 128 -> scale 1; 2.5 and -2.5 round away from zero (C round, not banker's).
    # Row 2: all zeros -> 0/0 = NaN -> 127, scale 0 (dequantizes to 0).
    weight = torch.tensor([[1.0, -1.0, 0.5, 0.0], [128.0, 2.5, -2.5, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float16)
    q, scales = quantize_weight(weight)
    assert q.t().tolist() == [[127, -128, 64, 0], [127, 3, -3, 1], [127, 127, 127, 127]]
    assert scales.tolist() == [1.0 / 128.0, 1.0, 0.0]
    assert torch.equal(dequantize_weight(q, scales)[2], torch.zeros(4, dtype=torch.float16))


def test_divides_by_fp32_scale_not_fp16_rounded_scale():
    # absmax 1.1 gives a float32 scale float16 cannot hold exactly: 0.09020996 / scale32 is
    # 10.497 (-> 10) while 0.09020996 / fp16(scale) is 10.5009 (-> 11).
    weight = torch.tensor([[1.1, 0.09020996]], dtype=torch.float32)
    q, scales = quantize_weight(weight)
    scale32 = np.float32(1.1) * np.float32(1 / 128)
    scale16 = np.float32(scales[0].item())
    by_fp32 = math.floor(float(np.float32(0.09020996) / scale32) + 0.5)
    by_fp16 = math.floor(float(np.float32(0.09020996) / scale16) + 0.5)
    assert by_fp32 != by_fp16
    assert q[1, 0].item() == by_fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_and_fp32_use_the_same_math_on_float32_values(dtype):
    weight = torch.randn(24, 40).to(dtype)
    q, scales = quantize_weight(weight)
    ref_q, ref_scales = reference_quantize(weight.float())
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(scales.numpy().view(np.uint16), ref_scales.view(np.uint16))


def test_negative_absmax_maps_to_minus_128_and_positive_to_127():
    weight = torch.tensor([[-3.0, 1.5], [2.0, -1.0]], dtype=torch.float16)
    q, _ = quantize_weight(weight)
    assert q[0, 0].item() == -128 and q[0, 1].item() == 127


def test_dequantize_fp16_is_one_rounding_of_fp16_product():
    weight = (torch.randn(32, 48) * 0.02).half()
    q, scales = quantize_weight(weight)
    expected = q.t().half() * scales[:, None]  # an fp16 multiply rounds once
    assert torch.equal(dequantize_weight(q, scales), expected)
    exact = q.t().double() * scales.double()[:, None]
    assert torch.equal(dequantize_weight(q, scales, torch.float32).double(), exact)


def test_quantization_error_is_within_half_a_step():
    weight = torch.randn(16, 64)
    q, scales = quantize_weight(weight)
    error = (dequantize_weight(q, scales, torch.float32) - weight).abs()
    step = scales.float()[:, None]
    # Half a step from rounding, plus the one-step clip of +absmax (128 -> 127) and fp16 scale rounding.
    assert bool((error <= step * 1.0 + 1e-3 * weight.abs()).all())


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.zeros(4), ValueError),
        (torch.zeros(2, 2, 2), ValueError),
        (torch.zeros(4, 4, dtype=torch.int32), TypeError),
        (torch.zeros(0, 4), ValueError),
        (torch.tensor([[1.0, float("nan")]]), ValueError),
        (torch.tensor([[1.0, float("inf")]]), ValueError),
    ],
)
def test_bad_weights_are_clear_errors(bad, error):
    with pytest.raises(error):
        quantize_weight(bad)


def test_channels_whose_scale_underflows_to_zero_warn_with_the_layer_name():
    weight = torch.randn(4, 16)
    weight[1] *= 1e-9  # absmax/128 is below float16's smallest subnormal
    weight[2] = 0.0  # an all-zero channel is exact at scale 0: no warning for it
    with pytest.warns(RuntimeWarning, match=r"layer 'model.layers.0.mlp.up_proj': 1 output channel\(s\)"):
        q, scales = quantize_weight(weight, name="model.layers.0.mlp.up_proj")
    assert scales[1] == 0 and scales[0] > 0 and scales[3] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_weight(torch.randn(4, 16))
