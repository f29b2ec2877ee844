"""Triton kernel cases, run by test_triton_interpreter.py in a process with TRITON_INTERPRET=1.

Not collected on its own (no ``test_`` prefix): the interpreter must be switched on before Triton
compiles anything, so these run in a fresh interpreter process on CPU tensors.
"""

import os

import pytest
import torch

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
