"""Every compiled-kernel call checks its operands first: bad tensors raise a clear error, never reach C."""

import pytest
import torch
from torch import nn

from eetq_lora import EetqLinear
from eetq_lora.kernels import cpu_library, dispatch, native, stream
from eetq_lora.kernels.native import KernelInputError

pytestmark = pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")

R, C, M = 48, 40, 3


def good():
    return torch.randn(M, C), torch.randint(-127, 128, (R, C), dtype=torch.int8), torch.rand(R) + 0.5


CALLS = {
    # name: (call(a, q, scale), activation width, activation dtype, scale dtype, scale side)
    "rowdot": (lambda a, q, s: native.rowdot(a, q, s, None), C, torch.float32, torch.float32, R),
    "rowaxpy": (lambda a, q, s: native.rowaxpy(a, q, None, s), R, torch.float32, torch.float32, C),
    "stream-rowdot": (lambda a, q, s: native.stream(a, q, s, "rowdot", True), C, torch.bfloat16, torch.float16, R),
    "stream-rowaxpy": (lambda a, q, s: native.stream(a, q, s, "rowaxpy", False), R, torch.float16, torch.float16, C),
}
if cpu_library.has_bf16_dot():
    CALLS["rowdot_bf16"] = (lambda a, q, s: native.rowdot_bf16(a, q, s), C, torch.bfloat16, torch.float32, R)
    CALLS["rowaxpy_bf16"] = (lambda a, q, s: native.rowaxpy_bf16(a, q, s), R, torch.bfloat16, torch.float32, C)


def operands(name):
    call, width, a_dtype, s_dtype, s_len = CALLS[name]
    a = torch.randn(M, width).to(a_dtype)
    q = torch.randint(-127, 128, (R, C), dtype=torch.int8)
    s = (torch.rand(s_len) + 0.5).to(s_dtype)
    return call, a, q, s


BREAKAGES = {
    "activation on meta": (lambda a, q, s: (a.to("meta"), q, s), "not the CPU"),
    "weight on meta": (lambda a, q, s: (a, q.to("meta"), s), "not the CPU"),
    "float weight": (lambda a, q, s: (a, q.float(), s), "int8"),
    "weight with strided columns": (lambda a, q, s: (a, torch.cat([q, q], 1)[:, ::2], s), "adjacent columns"),
    "int activation": (lambda a, q, s: (a.to(torch.int32), q, s), "activation must be"),
    "activation with strided columns": (lambda a, q, s: (torch.cat([a, a], 1)[:, ::2], q, s), "adjacent columns"),
    "activation too narrow": (lambda a, q, s: (a[:, :-1].contiguous(), q, s), "columns but the weight"),
    "scales too short": (lambda a, q, s: (a, q, s[:-1]), "one contiguous CPU"),
    "scales of another dtype": (lambda a, q, s: (a, q, s.double()), "one contiguous CPU"),
    "scales not contiguous": (lambda a, q, s: (a, q, torch.stack([s, s], 1)[:, 0]), "one contiguous CPU"),
    "scales on meta": (lambda a, q, s: (a, q, s.to("meta")), "one contiguous CPU"),
    "weight storage freed": (lambda a, q, s: (a, freed(q), s), "memory of the weight has been freed"),
    "weight storage shrunk": (lambda a, q, s: (a, shrunk(q), s), "memory of the weight has been freed"),
    "scales storage freed": (lambda a, q, s: (a, q, freed(s)), "memory of the scales has been freed"),
    "activation storage freed": (lambda a, q, s: (freed(a), q, s), "memory of the activation has been freed"),
}


def freed(t):
    """``t`` with its memory released under it, as FSDP2 frees a gathered weight."""
    t = t.clone()
    t.untyped_storage().resize_(0)
    return t


def shrunk(t):
    t = t.clone()
    t.untyped_storage().resize_(t.element_size() * t.numel() // 2)
    return t


@pytest.mark.parametrize("call_name", list(CALLS))
def test_good_operands_run(call_name):
    call, a, q, s = operands(call_name)
    assert torch.isfinite(call(a, q, s)).all()


@pytest.mark.parametrize("breakage", list(BREAKAGES))
@pytest.mark.parametrize("call_name", list(CALLS))
def test_each_bad_operand_is_refused_before_the_call(call_name, breakage):
    call, a, q, s = operands(call_name)
    breaking, message = BREAKAGES[breakage]
    with pytest.raises(KernelInputError, match=message):
        call(*breaking(a, q, s))


def test_dequantize_checks_its_output_and_scales():
    q = torch.randint(-127, 128, (R, C), dtype=torch.int8)
    rows, columns = torch.rand(R), torch.rand(C)
    with pytest.raises(KernelInputError, match="rows"):
        native.dequantize_into(torch.empty(R - 1, C), q, rows, None)
    with pytest.raises(KernelInputError, match="one contiguous CPU"):
        native.dequantize_into(torch.empty(R, C), q, None, columns[:-1])
    with pytest.raises(KernelInputError, match="activation must be"):
        native.dequantize_into(torch.empty(R, C, dtype=torch.float16), q, rows, None)
    out = torch.empty(R, C)
    native.dequantize_into(out, q, rows, columns)
    assert torch.equal(out, q.float() * rows[:, None] * columns)


def test_layer_on_the_meta_device_raises_instead_of_crashing():
    layer = EetqLinear(128, 192, device="meta")
    for rows in (1, 2, 8, 300):
        with pytest.raises(ValueError, match="meta.*load its weights first"):
            layer(torch.randn(rows, 128))


@pytest.mark.parametrize("rows", [1, 2, 8, 300])
def test_scales_shorter_than_the_outputs_raise_at_every_size(rows):
    layer = EetqLinear.from_linear(nn.Linear(128, 192))
    layer.weight_scales = layer.weight_scales[:100].clone()
    with pytest.raises(ValueError, match="one float value per output channel"):
        layer(torch.randn(rows, 128))


def test_a_decode_adapter_on_another_device_takes_the_general_path():
    layer = EetqLinear.from_linear(nn.Linear(64, 48, bias=False))
    plan = stream.StreamPlan(layer.weight, layer.weight_scales)
    x = torch.randn(1, 64)
    with torch.no_grad():
        fused = dispatch.fused_adapter_forward
        assert fused(plan, x, torch.randn(4, 64, device="meta"), torch.randn(48, 4), 1.0) is None
        assert fused(plan, x, torch.randn(4, 64), torch.randn(48, 4, device="meta"), 1.0) is None


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("tensor", ["weight", "weight_scales"])
def test_a_layer_whose_memory_was_freed_after_a_call_raises_instead_of_reading_it(rows, tensor):
    # The layer's cached plan held the old addresses; the rebuilt one must see the storage is gone.
    module = EetqLinear.from_linear(nn.Linear(256, 192, bias=False), dtype=torch.float32)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        module(x)
        getattr(module, tensor).untyped_storage().resize_(0)
        with pytest.raises((KernelInputError, RuntimeError), match="freed|out of bounds"):
            module(x)
