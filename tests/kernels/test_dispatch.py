"""The dispatch point: which path runs, and that every dispatched result matches float64 math."""

import pytest
import torch

import eetq_lora.kernels.dispatch as dispatch
from eetq_lora.kernels import cpu, cpu_library
from eetq_lora.kernels.dispatch import (
    INT8PACK_MAX_ROWS,
    STREAM_MAX_ROWS,
    STREAM_MAX_ROWS_FLOAT32_KERNELS,
    int8_linear,
    matmul_forward,
    matmul_grad_input,
    select_path,
)
from eetq_lora.kernels.policy import compute_dtype
from tests.kernels.helpers import float64_forward, float64_grad_input, int8_weight, relative_error

# Relative error budget against float64 by compute dtype (see test_cpu_paths).
BUDGET = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
# Output rounding alone, for float16 results computed in float32.
FLOAT16_OUTPUT = 1e-3

needs_native = pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")


@needs_native
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["forward", "grad_input"])
def test_cpu_rows_threshold_separates_stream_and_tiled(compute, op):
    qweight, _ = int8_weight(64, 48)
    limit = dispatch.stream_limit(op, compute)
    assert limit in (STREAM_MAX_ROWS[(op, compute)], STREAM_MAX_ROWS_FLOAT32_KERNELS.get((op, compute)))
    assert select_path("cpu", compute, 1, qweight, op).name == "cpu-stream"
    assert select_path("cpu", compute, limit, qweight, op).name == "cpu-stream"
    assert select_path("cpu", compute, limit + 1, qweight, op).name == "cpu-tiled"


@needs_native
@pytest.mark.parametrize("bf16_dot", [True, False])
def test_streaming_limits_follow_the_cpus_kernels(monkeypatch, bf16_dot):
    # With the bfloat16 dot products (AVX512-BF16) bfloat16 GEMMs are native and take over from 32
    # rows; without them bfloat16 keeps streaming, and float32 leaves sooner.
    monkeypatch.setattr(cpu_library, "has_bf16_dot", lambda: bf16_dot)
    qweight, _ = int8_weight(64, 48)
    expected = {torch.bfloat16: 32, torch.float32: 128} if bf16_dot else {torch.bfloat16: 128, torch.float32: 48}
    for compute, limit in expected.items():
        for op in ("forward", "grad_input"):
            assert select_path("cpu", compute, limit, qweight, op).name == "cpu-stream"
            assert select_path("cpu", compute, limit + 1, qweight, op).name == "cpu-tiled"


def test_without_compiled_kernels_cpu_uses_torch_paths(monkeypatch):
    monkeypatch.setattr(cpu_library, "is_available", lambda: False)
    packed, _ = int8_weight(64, 48, "out_in")
    plain, _ = int8_weight(64, 48, "in_out")
    assert select_path("cpu", torch.bfloat16, 1, packed).name == "cpu-int8pack"
    assert select_path("cpu", torch.bfloat16, INT8PACK_MAX_ROWS, packed).name == "cpu-int8pack"
    assert select_path("cpu", torch.bfloat16, INT8PACK_MAX_ROWS + 1, packed).name == "cpu-tiled"
    assert select_path("cpu", torch.bfloat16, 1, plain).name == "cpu-tiled"
    assert select_path("cpu", torch.bfloat16, 1, packed, "grad_input").name == "cpu-tiled"
    assert select_path("cpu", torch.float32, 1, packed).name == "cpu-tiled"


def test_other_devices_and_cuda_without_triton_use_reference(monkeypatch):
    qweight, _ = int8_weight(64, 48)
    assert select_path("mps", torch.float32, 1, qweight).name == "reference"
    monkeypatch.setattr(dispatch, "_triton_usable", lambda: True)
    assert select_path("cuda", torch.float16, 1, qweight).name == "cuda-triton"
    # The README's "a fused Triton w8a16 kernel for small M and ... dequantize + cuBLAS from M=64 on".
    assert select_path("cuda", torch.bfloat16, 63, qweight, "grad_input").name == "cuda-triton"
    assert select_path("cuda", torch.bfloat16, 64, qweight, "grad_input").name == "cuda-dequant"
    assert select_path("cuda", torch.float16, 4096, qweight).name == "cuda-dequant"
    assert select_path("cuda", torch.float32, 1, qweight).name == "cuda-dequant"
    monkeypatch.setattr(dispatch, "_triton_usable", lambda: False)
    assert select_path("cuda", torch.float16, 1, qweight).name == "reference"
    assert select_path("cuda", torch.float32, 1, qweight).name == "reference"


def test_environment_forces_reference(monkeypatch):
    monkeypatch.setenv("EETQ_LORA_KERNELS", "reference")
    qweight, _ = int8_weight(64, 48)
    assert select_path("cpu", torch.bfloat16, 1, qweight).name == "reference"


@pytest.mark.parametrize("read_through", ["c", "os.environ"])
def test_the_reference_switch_follows_every_change_to_the_environment(monkeypatch, read_through):
    if read_through == "os.environ":
        monkeypatch.setattr(dispatch, "_getenv", None)
    elif dispatch._getenv is None:
        pytest.skip("no C getenv on this platform")
    monkeypatch.delenv("EETQ_LORA_KERNELS", raising=False)
    assert not dispatch.reference_forced()
    for value, forced in (("reference", True), (" Reference\n", True), ("", False), ("fast", False)):
        monkeypatch.setenv("EETQ_LORA_KERNELS", value)
        assert dispatch.reference_forced() is forced, value
    monkeypatch.delenv("EETQ_LORA_KERNELS")
    assert not dispatch.reference_forced()


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 8, 33, 200])
def test_dispatched_matmuls_match_float64(monkeypatch, use_native, layout, dtype, rows):
    if use_native and not cpu_library.is_available():
        pytest.skip("no compiled kernels")
    monkeypatch.setattr(cpu_library, "is_available", lambda: use_native)
    qweight, scales = int8_weight(96, 80, layout)
    x = torch.randn(rows, 96).to(dtype)
    grad = torch.randn(rows, 80).to(dtype)
    y = matmul_forward(x, qweight, scales)
    dx = matmul_grad_input(grad, qweight, scales)
    assert y.dtype == dx.dtype == dtype
    budget = FLOAT16_OUTPUT if dtype == torch.float16 else BUDGET[dtype]
    assert relative_error(y, float64_forward(x, qweight, scales)) < budget
    assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < budget


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [4, 300])
def test_bfloat16_opt_in_stays_within_bfloat16_budget(input_dtype, rows):
    qweight, scales = int8_weight(96, 80)
    x = torch.randn(rows, 96).to(input_dtype)
    with compute_dtype(torch.bfloat16):
        y = matmul_forward(x, qweight, scales)
    assert y.dtype == input_dtype
    assert relative_error(y, float64_forward(x, qweight, scales)) < BUDGET[torch.bfloat16]


def test_backward_uses_the_compute_dtype_of_its_forward(monkeypatch):
    seen = []
    original = cpu.tiled_grad_input

    def spy(grad, qweight, scales, dtype):
        seen.append(dtype)
        return original(grad, qweight, scales, dtype)

    monkeypatch.setattr(dispatch, "CPU_TILED", dispatch.CPU_TILED._replace(grad_input=spy))
    monkeypatch.setattr(cpu_library, "is_available", lambda: False)
    qweight, scales = int8_weight(96, 80)
    x = torch.randn(300, 96, requires_grad=True)
    with compute_dtype(torch.bfloat16):
        y = int8_linear(x, qweight, scales, None)
    y.sum().backward()
    assert seen == [torch.bfloat16]
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("rows", [2, 200])
def test_autograd_saves_only_the_int8_weight_and_scales(monkeypatch, use_native, rows):
    if use_native and not cpu_library.is_available():
        pytest.skip("no compiled kernels")
    monkeypatch.setattr(cpu_library, "is_available", lambda: use_native)
    qweight, scales = int8_weight(96, 80)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    x = torch.randn(rows, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = int8_linear(x, qweight, scales, None)
    assert saved == [(torch.int8, (96, 80)), (torch.float16, (80,))]
    upstream = torch.randn(rows, 80)
    y.backward(upstream)
    assert relative_error(x.grad, float64_grad_input(upstream, qweight, scales)) < BUDGET[torch.float32]


@pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_step_skips_the_general_dispatch_and_agrees_with_it(monkeypatch, dtype, rows):
    qweight, scales = int8_weight(96, 80)
    x = torch.randn(1, rows, 96).to(dtype)
    bias = torch.randn(80).half()
    expected = dispatch.matmul_forward(x.reshape(-1, 96), qweight, scales).reshape(1, rows, 80) + bias.to(dtype)
    monkeypatch.setattr(dispatch, "matmul_forward", lambda *args: pytest.fail("took the general path"))
    with torch.no_grad():
        out = dispatch.int8_linear(x, qweight, scales, bias)
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")
def test_decode_step_leaves_other_cases_to_the_dispatcher(monkeypatch):
    qweight, scales = int8_weight(96, 80)
    calls = []
    general = dispatch.matmul_forward
    monkeypatch.setattr(dispatch, "matmul_forward", lambda *args: calls.append(1) or general(*args))
    with torch.no_grad():
        dispatch.int8_linear(torch.randn(96, 2).t(), qweight, scales, None)  # non-contiguous activation
        dispatch.int8_linear(torch.randn(8, 96), qweight, scales, None)  # M past the decode rows
        dispatch.int8_linear(torch.randn(2, 96), qweight.t().contiguous().t(), scales, None)  # [out, in] storage
        monkeypatch.setenv("EETQ_LORA_KERNELS", "reference")
        dispatch.int8_linear(torch.randn(2, 96), qweight, scales, None)
    assert len(calls) == 4


@pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_step_backward_agrees_with_the_general_gradient(monkeypatch, dtype):
    qweight, scales = int8_weight(96, 80)
    x = torch.randn(2, 96).to(dtype).requires_grad_()
    grad = torch.randn(2, 80).to(dtype)
    expected = dispatch.matmul_grad_input(grad, qweight, scales)
    monkeypatch.setattr(dispatch, "matmul_grad_input", lambda *args: pytest.fail("took the general path"))
    dispatch.int8_linear(x, qweight, scales, None).backward(grad)
    assert x.grad.dtype == dtype and torch.equal(x.grad, expected)
