"""Each CPU path of the int8 matmul against the float64 reference, on both weight layouts."""

import pytest
import torch

from eetq_lora import dequantize_weight
from eetq_lora.kernels import cpu, cpu_library, native, reference
from tests.kernels.helpers import SHAPES, float64_forward, float64_grad_input, int8_weight, relative_error

ROWS = [0, 1, 2, 3, 5, 8, 17, 40]
LAYOUTS = ["in_out", "out_in"]
# Error budget against float64, relative to the largest output: float32 accumulation, or
# bfloat16 rounding of the activation, the dequantized weight and the result.
EXACT = 1e-5
BF16 = 1.6e-2

needs_native = pytest.mark.skipif(
    not cpu_library.is_available(), reason=f"no compiled kernels: {cpu_library.status().get('reason')}"
)


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stream_kernels_match_float64(shape, layout, rows, dtype):
    qweight, scales = int8_weight(*shape, layout)
    x = torch.randn(rows, shape[0]).to(dtype)
    grad = torch.randn(rows, shape[1]).to(dtype)
    y = cpu.stream_forward(x, qweight, scales)
    dx = cpu.stream_grad_input(grad, qweight, scales)
    # float32 accumulation from exact inputs, whatever the activation dtype; a bfloat16 or float16
    # input gets its result back in its own dtype, rounded once at the end.
    budget = {torch.float32: EXACT, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    assert y.dtype == dx.dtype == dtype
    assert relative_error(y, float64_forward(x, qweight, scales)) < budget
    assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < budget
    if dtype != torch.float32 and rows:
        # Exactly the float32 kernel's result, rounded once.
        assert torch.equal(y, cpu.stream_forward(x.float(), qweight, scales).to(dtype))
        assert torch.equal(dx, cpu.stream_grad_input(grad.float(), qweight, scales).to(dtype))


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ROWS)
def test_stream_kernels_in_bfloat16_compute_match_float64(shape, layout, rows):
    qweight, scales = int8_weight(*shape, layout)
    x = torch.randn(rows, shape[0]).bfloat16()
    grad = torch.randn(rows, shape[1]).bfloat16()
    y = cpu.stream_forward(x, qweight, scales, torch.bfloat16)
    dx = cpu.stream_grad_input(grad, qweight, scales, torch.bfloat16)
    # bfloat16 activations are exact in the forward; the gradient rounds grad * scale once. Below
    # BF16_DOT_MIN_ROWS the float32 kernels run and hand back bfloat16, rounded once.
    assert y.dtype in (torch.float32, torch.bfloat16)
    forward_budget = EXACT if y.dtype == torch.float32 else 2**-8
    assert relative_error(y, float64_forward(x, qweight, scales)) < forward_budget
    assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < BF16


@pytest.mark.skipif(not cpu_library.has_bf16_dot(), reason="no AVX512-BF16 build")
@pytest.mark.parametrize("shape", [(64, 48), (101, 37), (2, 33), (3, 64), (256, 320)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
def test_bfloat16_dot_kernels_are_exact_for_bfloat16_activations(shape, rows):
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    row_scale, col_scale = torch.rand(shape[0]) + 0.5, torch.rand(shape[1]) + 0.5
    a = torch.randn(rows, shape[1]).bfloat16()
    expected = (a.double() @ q.double().t()) * row_scale.double()
    assert relative_error(native.rowdot_bf16(a, q, row_scale), expected) < EXACT
    a = torch.randn(rows, shape[0]).bfloat16()
    expected = (a.double() @ q.double()) * col_scale.double()
    assert relative_error(native.rowaxpy_bf16(a, q, col_scale), expected) < EXACT


@needs_native
def test_stream_kernels_read_strided_activations():
    qweight, scales = int8_weight(100, 37)
    x = torch.randn(6, 300)[::2, 50:150]
    grad = torch.randn(37, 6).t()
    assert relative_error(cpu.stream_forward(x, qweight, scales), float64_forward(x, qweight, scales)) < EXACT
    assert (
        relative_error(cpu.stream_grad_input(grad, qweight, scales), float64_grad_input(grad, qweight, scales)) < EXACT
    )


@needs_native
def test_stream_kernels_in_bfloat16_compute_read_strided_activations():
    # Enough rows for the AVX512-BF16 kernels where the CPU has them: their bfloat16 copy of a
    # strided gradient must be made contiguous before the call.
    qweight, scales = int8_weight(100, 37)
    x = torch.randn(48, 300)[::2, 50:150].bfloat16()
    grad = torch.randn(37, 24).t().bfloat16()
    y = cpu.stream_forward(x, qweight, scales, torch.bfloat16)
    dx = cpu.stream_grad_input(grad, qweight, scales, torch.bfloat16)
    assert relative_error(y, float64_forward(x, qweight, scales)) < BF16
    assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < BF16


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [0, 1, 17, 70])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile_bytes", [cpu.TILE_BYTES, 4096])
def test_tiled_paths_match_float64(monkeypatch, shape, layout, rows, compute, tile_bytes):
    # 4096-byte tiles force many tiles (and a short last one) even on these small weights.
    monkeypatch.setattr(cpu, "TILE_BYTES", tile_bytes)
    qweight, scales = int8_weight(*shape, layout)
    x = torch.randn(rows, shape[0])
    grad = torch.randn(rows, shape[1])
    y = cpu.tiled_forward(x, qweight, scales, compute)
    dx = cpu.tiled_grad_input(grad, qweight, scales, compute)
    assert y.dtype == dx.dtype == compute
    budget = EXACT if compute == torch.float32 else BF16
    assert relative_error(y, float64_forward(x, qweight, scales)) < budget
    assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < budget


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_tiled_paths_agree_with_reference_path(compute):
    qweight, scales = int8_weight(256, 320)
    x = torch.randn(33, 256)
    grad = torch.randn(33, 320)
    tolerance = dict(rtol=1e-5, atol=1e-5) if compute == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(
        cpu.tiled_forward(x, qweight, scales, compute).float(),
        reference.forward(x, qweight, scales, compute).float(),
        **tolerance,
    )
    torch.testing.assert_close(
        cpu.tiled_grad_input(grad, qweight, scales, compute).float(),
        reference.grad_input(grad, qweight, scales, compute).float(),
        **tolerance,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_native", [True, False])
def test_dequantized_tiles_are_the_reference_weight_bit_for_bit(monkeypatch, dtype, use_native):
    if use_native and not cpu_library.is_available():
        pytest.skip("no compiled kernels")
    monkeypatch.setattr(cpu_library, "is_available", lambda: use_native)
    qweight, scales = int8_weight(100, 37)
    s = scales.float()
    expected = dequantize_weight(qweight, scales, dtype)  # [out, in]
    # Rows of [in, out] with a scale per column, and rows of [out, in] with a scale per row.
    by_columns = cpu._dequantize_tile(qweight, None, s, dtype)
    assert torch.equal(by_columns, expected.t())
    by_rows = cpu._dequantize_tile(qweight.t().contiguous(), s, None, dtype)
    assert torch.equal(by_rows, expected)


def test_tiled_path_keeps_only_a_bounded_workspace(monkeypatch):
    monkeypatch.setattr(cpu, "TILE_BYTES", 256 * 1024)
    cpu.release_workspaces()
    qweight, scales = int8_weight(512, 1024)
    cpu.tiled_forward(torch.randn(40, 512), qweight, scales, torch.bfloat16)
    cpu.tiled_grad_input(torch.randn(40, 1024), qweight, scales, torch.bfloat16)
    buffers = cpu._workspaces.buffers
    # The whole dequantized weight would be 1 MiB in bfloat16; the reused buffer stays one tile.
    assert sum(b.numel() * b.element_size() for b in buffers.values()) <= 256 * 1024
    cpu.release_workspaces()
    assert cpu._workspaces.buffers == {}


def test_weight_rows_prefers_output_rows_and_never_copies_plain_layouts():
    qweight, _ = int8_weight(100, 37, "out_in")
    view, rows_are_outputs = cpu.weight_rows(qweight)
    assert rows_are_outputs and view.data_ptr() == qweight.data_ptr() and view.shape == (37, 100)
    qweight, _ = int8_weight(100, 37, "in_out")
    view, rows_are_outputs = cpu.weight_rows(qweight)
    assert not rows_are_outputs and view is qweight
    odd = torch.randint(-128, 128, (200, 74), dtype=torch.int8)[::2, ::2]
    view, rows_are_outputs = cpu.weight_rows(odd)
    assert rows_are_outputs and view.is_contiguous() and torch.equal(view, odd.t())


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_int8pack_fallback_matches_float64(rows):
    qweight, scales = int8_weight(256, 320, "out_in")
    assert cpu.int8pack_supported(qweight)
    assert not cpu.int8pack_supported(int8_weight(256, 320, "in_out")[0])
    x = torch.randn(rows, 256).bfloat16()
    y = cpu.int8pack_forward(x, qweight, scales)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, float64_forward(x, qweight, scales)) < BF16


@needs_native
@pytest.mark.parametrize("kernel", ["rowaxpy", "rowdot"])
@pytest.mark.parametrize("scale_on_rows", [True, False])
def test_one_call_entry_converts_float16_scales_exactly(kernel, scale_on_rows):
    # Subnormal, zero, tiny and large float16 scales must reach the kernel as their exact float32 values.
    q = torch.randint(-128, 128, (40, 24), dtype=torch.int8)
    count = q.shape[0] if scale_on_rows else q.shape[1]
    special = torch.tensor([6e-8, 1e-6, 5.9e-5, 0.0, 6.2e-5, 1e-3, 1.0, 60000.0], dtype=torch.float16)
    scales = torch.cat([special, (torch.rand(count - len(special)) / 64).half()])
    a = torch.randn(3, q.shape[0] if kernel == "rowaxpy" else q.shape[1])
    row_scale, col_scale = (scales.float(), None) if scale_on_rows else (None, scales.float())
    expected = getattr(native, kernel)(a, q, row_scale, col_scale)
    assert torch.equal(native.stream(a, q, scales, kernel, scale_on_rows), expected)
    assert torch.equal(
        native.stream(a.bfloat16(), q, scales, kernel, scale_on_rows),
        getattr(native, kernel)(a.bfloat16().float(), q, row_scale, col_scale).bfloat16(),
    )


@needs_native
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_kernels_split_over_threads_match_float64(monkeypatch, rows, layout):
    # Test-sized layers run on one thread (SINGLE_THREAD_WORK_BYTES); force the split so the
    # per-thread partial sums and their reduction are checked too.
    monkeypatch.setattr(native, "SINGLE_THREAD_WORK_BYTES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        qweight, scales = int8_weight(200, 72, layout)
        assert native._threads(rows, qweight) == 2
        x = torch.randn(rows, 200)
        grad = torch.randn(rows, 72)
        for compute in (torch.float32, torch.bfloat16):
            y = cpu.stream_forward(x.to(compute), qweight, scales, compute)
            dx = cpu.stream_grad_input(grad.to(compute), qweight, scales, compute)
            budget = EXACT if compute == torch.float32 else BF16
            assert relative_error(y, float64_forward(x.to(compute), qweight, scales)) < budget
            assert relative_error(dx, float64_grad_input(grad.to(compute), qweight, scales)) < budget
    finally:
        torch.set_num_threads(threads)


def test_small_work_runs_on_one_thread():
    small, _ = int8_weight(128, 256)
    assert native._threads(1, small) == 1
    big = torch.empty(4096, 4096, dtype=torch.int8)
    assert native._threads(1, big) == torch.get_num_threads()
    assert native._threads(native.SINGLE_THREAD_WORK_BYTES // small.numel(), small) == torch.get_num_threads()


def test_one_thread_limit_follows_the_openmp_wait_policy():
    # Sleeping workers (PASSIVE) cost a wake-up per call; spinning ones (the default) do not.
    assert native.single_thread_work_bytes("passive") == native.single_thread_work_bytes(" PASSIVE ") == 4 * 2**20
    assert native.single_thread_work_bytes("") == native.single_thread_work_bytes("ACTIVE") == 256 * 2**10


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_single_row_kernels_cross_many_panels_and_row_blocks(layout, threads, monkeypatch):
    # One activation row has its own blocking: 64 KiB panels for rowaxpy (here 31 rows of 2100
    # bytes, so every thread crosses many) and 8 weight rows at a time for rowdot (1203 leaves a tail).
    monkeypatch.setattr(native, "threads_for", lambda work_bytes: threads)
    qweight, scales = int8_weight(1203, 2100, layout)
    x = torch.randn(1, 1203)
    grad = torch.randn(1, 2100)
    assert relative_error(cpu.stream_forward(x, qweight, scales), float64_forward(x, qweight, scales)) < EXACT
    expected_grad = float64_grad_input(grad, qweight, scales)
    assert relative_error(cpu.stream_grad_input(grad, qweight, scales), expected_grad) < EXACT


@needs_native
def test_float16_results_round_like_torch_through_subnormals_and_overflow():
    # A diagonal weight makes each output one product a[c] * q[c, c] * scale[c], computed in float32
    # like torch does; its rounding to float16 must match torch's for subnormal, normal, tied and
    # overflowing (to infinity) results alike.
    n = 4096
    generator = torch.Generator().manual_seed(0)
    exponents = torch.randint(-20, 12, (n,), generator=generator).double()
    a = (torch.randn(n, generator=generator, dtype=torch.float64) * 2**exponents).half()
    q = torch.diag(torch.randint(-128, 128, (n,), dtype=torch.int8, generator=generator))
    scales = torch.rand(n, generator=generator, dtype=torch.float64) * 2 ** torch.randint(-24, 8, (n,)).double()
    scales = scales.half()
    out = native.stream(a[None], q, scales, "rowaxpy", False)[0]
    expected = (a.float() * q.diagonal().float() * scales.float()).half()
    assert out.dtype == torch.float16
    assert torch.equal(out.isinf(), expected.isinf()) and expected.isinf().any()
    finite = ~expected.isinf()
    assert ((expected.abs() < 2**-14) & (expected != 0)).any()  # subnormal results occur
    assert torch.equal(out[finite], expected[finite])
