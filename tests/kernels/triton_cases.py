"""Triton kernel cases, run by test_triton_interpreter.py in a process with TRITON_INTERPRET=1.

Not collected on its own (no ``test_`` prefix): the interpreter must be switched on before Triton
compiles anything, so these run in a fresh interpreter process on CPU tensors.
"""

import os
import warnings

import pytest
import torch

from eetq_lora import dequantize_weight
from eetq_lora.kernels import triton_kernels
from eetq_lora.kernels.triton_kernels import Config, w8_matmul
from tests.kernels.helpers import float64_forward, float64_grad_input, int8_weight, relative_error

# Relative to the largest output: float16 rounds at 2**-11, bfloat16 at 2**-8 (activation, row-scaled
# weight tile and result each round once).
BUDGET = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

pytestmark = pytest.mark.skipif(not triton_kernels.interpreting(), reason="needs TRITON_INTERPRET=1")


def test_available_under_the_interpreter():
    assert os.environ["TRITON_INTERPRET"] == "1" and triton_kernels.is_available()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("shape, rows", [((64, 48), 1), ((100, 37), 5), ((96, 160), 33), ((512, 64), 3)])
def test_forward_and_grad_input_match_float64(dtype, layout, shape, rows):
    # (512, 64) with 3 rows has too few output tiles for the processor count: the reduction splits.
    qweight, scales = int8_weight(*shape, layout)
    x = torch.randn(rows, shape[0]).to(dtype)
    grad = torch.randn(rows, shape[1]).to(dtype)
    y = triton_kernels.forward(x, qweight, scales)
    dx = triton_kernels.grad_input(grad, qweight, scales)
    assert y.dtype == dx.dtype == dtype and y.shape == (rows, shape[1]) and dx.shape == (rows, shape[0])
    assert relative_error(y, float64_forward(x, qweight, scales)) < BUDGET[dtype]
    assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < BUDGET[dtype]


@pytest.mark.parametrize("split", [1, 3])
def test_explicit_configs_and_reduction_split_agree(split):
    qweight, scales = int8_weight(200, 48)
    x = torch.randn(20, 200).half()
    config = Config(block_m=16, block_p=32, block_r=32, split=split)
    y = w8_matmul(x, qweight, scales, reduce_over_inputs=True, config=config)
    assert relative_error(y, float64_forward(x, qweight, scales)) < BUDGET[torch.float16]


def test_empty_batch_and_bad_dtype():
    qweight, scales = int8_weight(64, 48)
    assert triton_kernels.forward(torch.zeros(0, 64).half(), qweight, scales).shape == (0, 48)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        triton_kernels.forward(torch.zeros(2, 64), qweight, scales)


def test_config_choice_fills_the_gpu_and_fits_pre_ampere(monkeypatch):
    device = torch.device("cpu")
    small = triton_kernels.choose_config(1, 4096, 4096, device)
    # 64 output tiles for 4 processors already fill them: no split.
    assert small.block_m == 16 and small.split == 1
    narrow = triton_kernels.choose_config(1, 64, 4096, device)
    assert narrow.split == 16
    big = triton_kernels.choose_config(2048, 4096, 4096, device)
    assert big.block_m == 128 and big.split == 1 and big.num_stages == 3
    monkeypatch.setattr(triton_kernels, "_capability", lambda device: (7, 5))
    assert triton_kernels.choose_config(2048, 4096, 4096, device).num_stages == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_dequantize_is_bit_exact(dtype, layout):
    # Odd shapes leave partial tiles on both axes; float16 must be EETQ's fp16(q * scale).
    qweight, scales = int8_weight(70, 150, layout)
    weight_t = triton_kernels.dequantize(qweight, scales, dtype)
    assert weight_t.dtype == dtype and weight_t.shape == (70, 150) and weight_t.is_contiguous()
    assert torch.equal(weight_t, dequantize_weight(qweight, scales, dtype).t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_sum_is_one_rounding_of_the_float32_sum(dtype):
    partial = torch.randn(5, 7, 300)
    summed = triton_kernels._sum_splits(partial, dtype)
    assert summed.dtype == dtype
    assert torch.equal(summed, partial.sum(dim=0).to(dtype))


def test_split_sum_keeps_a_nan_with_a_full_mantissa_in_bfloat16():
    # Rounding by adding half an ulp would carry 0x7FFFFFFF or 0xFFFFFFFF into the exponent and sign.
    partial = torch.zeros(2, 1, 4)
    partial[0, 0, :3] = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    summed = triton_kernels._sum_splits(partial, torch.bfloat16)
    assert summed[0, :3].isnan().all() and summed[0, 3] == 0


@pytest.mark.parametrize("path_rows", [1, 70])
def test_dispatcher_cuda_paths_match_float64(monkeypatch, path_rows):
    # The dispatcher's CUDA branches (fused kernel below CUDA_DEQUANT_MIN_ROWS, dequantize + GEMM
    # from it on), run on CPU tensors by forcing the path.
    from eetq_lora.kernels import dispatch

    paths = {"cuda-triton": dispatch.CUDA_TRITON, "cuda-dequant": dispatch.CUDA_DEQUANT}
    expected_path = "cuda-triton" if path_rows < dispatch.CUDA_DEQUANT_MIN_ROWS else "cuda-dequant"
    monkeypatch.setattr(dispatch, "select_path", lambda *args, **kwargs: paths[expected_path])
    qweight, scales = int8_weight(96, 80)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(path_rows, 96).to(dtype)
        grad = torch.randn(path_rows, 80).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failing kernel would warn and fall back to the reference
            y = dispatch.matmul_forward(x, qweight, scales, dtype)
            dx = dispatch.matmul_grad_input(grad, qweight, scales, dtype)
        assert not dispatch._triton_failed
        assert y.dtype == dx.dtype == dtype
        assert relative_error(y, float64_forward(x, qweight, scales)) < BUDGET[dtype]
        assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < BUDGET[dtype]
