"""The one-call CPU path: a layer's cached plan, when it is rebuilt, and that it agrees with the dispatcher."""

import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

import eetq_lora.kernels.dispatch as dispatch
from eetq_lora import EetqLinear
from eetq_lora.kernels import cpu_library, native
from tests.kernels.helpers import float64_forward, float64_grad_input, relative_error

pytestmark = pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")


def layer(in_features=96, out_features=80, bias=False, seed=0):
    torch.manual_seed(seed)
    return EetqLinear.from_linear(nn.Linear(in_features, out_features, bias=bias)).eval()


def general_forward(module, x):
    """The dispatcher's result for the same call, bypassing the decode path."""
    out = dispatch.matmul_forward(x.reshape(-1, module.in_features), module.weight, module.weight_scales)
    out = out.reshape(*x.shape[:-1], module.out_features)
    return out if module.bias is None else out + module.bias.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (1, 2, 96), (96,)])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_decode_matches_the_dispatcher_and_float64(monkeypatch, dtype, shape, bias):
    module = layer(bias=bias)
    x = torch.randn(*shape).to(dtype)
    expected = general_forward(module, x)
    monkeypatch.setattr(dispatch, "matmul_forward", lambda *a: pytest.fail("took the general path"))
    with torch.no_grad():
        out = module(x)
    assert out.dtype == dtype and out.shape == expected.shape and torch.equal(out, expected)
    reference = float64_forward(x.reshape(-1, 96), module.weight, module.weight_scales).reshape(expected.shape)
    if bias:
        reference = reference + module.bias.double()
    assert relative_error(out, reference) < {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


def test_plan_is_cached_and_rebuilt_when_the_weight_changes():
    module = layer()
    x = torch.randn(1, 96)
    plan = module.stream_plan()
    assert plan is not None and module.stream_plan() is plan
    with torch.no_grad():
        before = module(x)
        # Replacing the tensor object, or the storage behind the same object, both rebuild the plan.
        module.weight = nn.Parameter(module.weight.flip(0).contiguous(), requires_grad=False)
        assert module.stream_plan() is not plan
        torch.testing.assert_close(module(x), general_forward(module, x), rtol=0, atol=0)
        plan = module.stream_plan()
        module.weight.data = module.weight.data.flip(0).contiguous()
        assert module.stream_plan() is not plan
        assert torch.equal(module(x), before)


def test_plan_follows_load_state_dict_in_place_and_by_assignment():
    module, other = layer(seed=0), layer(seed=1)
    x = torch.randn(1, 96)
    with torch.no_grad():
        module(x)
        module.load_state_dict(other.state_dict())
        assert torch.equal(module(x), other(x))
        module.load_state_dict(layer(seed=2).state_dict(), assign=True)
        assert torch.equal(module(x), layer(seed=2)(x))


def test_plan_does_not_keep_a_replaced_weight_alive():
    module = layer()
    with torch.no_grad():
        module(torch.randn(1, 96))
    old = weakref.ref(module.weight)
    module.weight = nn.Parameter(module.weight.clone(), requires_grad=False)
    gc.collect()
    assert old() is None


def test_moving_the_layer_drops_its_plan():
    module = layer()
    module.stream_plan()
    assert "_eetq_stream_plan" in module.__dict__
    module.to(torch.float32)
    assert "_eetq_stream_plan" not in module.__dict__


def test_a_scale_or_weight_swapped_at_the_same_address_rebuilds_the_plan():
    # `.data =` can put a tensor of another stride or dtype at the same address: the plan must not
    # keep reading it the old way.
    module = layer()
    x = torch.randn(1, 96)
    buffer = torch.rand(2 * 80, dtype=torch.float16) + 0.5
    with torch.no_grad():
        module.weight_scales = buffer[:80]
        module(x)
        module.weight_scales.data = buffer[::2]
        assert module.weight_scales.data_ptr() == buffer.data_ptr()
        expected = float64_forward(x, module.weight, module.weight_scales.contiguous())
        assert relative_error(module(x), expected) < 1e-6
        module.weight.data = module.weight.data.view(torch.uint8)
        with pytest.raises(ValueError, match="int8"):
            module(x)


def test_weights_that_cannot_stream_have_no_plan():
    module = layer()
    module.weight.data = module.weight.data.t().contiguous().t()  # [in, out] view of [out, in] storage
    assert module.stream_plan() is None
    with torch.no_grad():
        x = torch.randn(1, 96)
        torch.testing.assert_close(module(x), general_forward(module, x), rtol=0, atol=0)


def test_reference_switch_applies_to_layers_with_a_plan(monkeypatch):
    module = layer()
    x = torch.randn(1, 96)
    with torch.no_grad():
        module(x)
        monkeypatch.setenv("EETQ_LORA_KERNELS", "reference")
        assert dispatch.reference_forced() and dispatch.one_call_forward(module.stream_plan(), x) is None
        paths = []
        original = dispatch.select_path
        monkeypatch.setattr(dispatch, "select_path", lambda *a: paths.append(original(*a).name) or original(*a))
        module(x)
    assert paths == ["reference"]
    monkeypatch.setenv("EETQ_LORA_KERNELS", "")
    assert not dispatch.reference_forced()


def test_cases_the_decode_path_leaves_to_the_dispatcher():
    module = layer()
    plan = module.stream_plan()
    with torch.no_grad():
        assert dispatch.one_call_forward(plan, torch.randn(4, 96)) is None  # too many rows
        assert dispatch.one_call_forward(plan, torch.randn(1, 96).double()) is None  # float64
        assert dispatch.one_call_forward(plan, torch.randn(96, 2).t()) is None  # not contiguous
        assert dispatch.one_call_forward(plan, torch.randn(1, 95)) is None  # wrong width
        assert dispatch.one_call_forward(plan, torch.tensor(1.0)) is None  # zero-dimensional
    x = torch.randn(1, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)  # like nn.Linear: the input is cast to the autocast dtype first
    assert out.dtype == torch.bfloat16 and torch.equal(out, general_forward(module, x.bfloat16()))


def test_training_step_uses_the_plan_forward_and_backward(monkeypatch):
    module = layer()
    x = torch.randn(2, 96, requires_grad=True)
    grad = torch.randn(2, 80)
    expected = general_forward(module, x.detach())
    expected_grad = dispatch.matmul_grad_input(grad, module.weight, module.weight_scales)
    monkeypatch.setattr(dispatch, "matmul_forward", lambda *a: pytest.fail("took the general path"))
    monkeypatch.setattr(dispatch, "matmul_grad_input", lambda *a: pytest.fail("took the general path"))
    out = module(x)
    out.backward(grad)
    assert torch.equal(out, expected) and torch.equal(x.grad, expected_grad)


@pytest.mark.parametrize("rank", [1, 5, 16, 20])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapter_in_the_decode_call_matches_peft_roundings(rank, rows, dtype):
    # Odd sizes reach the vector loops' tails (in, out and rank not multiples of 16 or 4).
    module = layer(in_features=100, out_features=37)
    generator = torch.Generator().manual_seed(rank)
    lora_a = torch.randn(rank, 100, generator=generator) / 10
    lora_b = torch.randn(37, rank, generator=generator) / 10
    x = torch.randn(rows, 100, generator=generator).to(dtype)
    with torch.no_grad():
        out = dispatch.fused_adapter_forward(module.stream_plan(), x, lora_a, lora_b, 2.0)
        base = general_forward(module, x)
        # PEFT's steps: the adapter in float32 (here float64), cast to x's dtype, scaled, then added.
        adapter = (x.double() @ lora_a.double().t() @ lora_b.double().t()).to(dtype) * 2.0
        expected = base + adapter
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        # Sums in another order can move a result to the neighbouring bfloat16/float16, no further.
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(out, expected, rtol=ulp, atol=1e-2)
        assert (out == expected).float().mean() > 0.9


@pytest.mark.parametrize("out_features", [16, 21])
def test_a_nan_in_the_adapter_stays_nan_in_a_bfloat16_decode(out_features):
    # 0x7FFFFFFF and 0xFFFFFFFF are NaNs whose mantissa is full: rounding them to bfloat16 by adding
    # half an ulp carries into the exponent and sign, to zero or infinity, unless NaN is kept apart.
    module = layer(in_features=32, out_features=out_features)
    lora_a = torch.randn(4, 32) / 10
    lora_b = torch.randn(out_features, 4) / 10
    payloads = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    lora_b[:, 0] = payloads.repeat(out_features)[:out_features]
    x = torch.randn(1, 32).to(torch.bfloat16)
    with torch.no_grad():
        out = dispatch.fused_adapter_forward(module.stream_plan(), x, lora_a, lora_b, 2.0)
    # 16 columns run in the vector loop only, 21 in its tail too.
    assert out.isnan().all()


def test_adapter_operands_follow_the_adapter_and_its_scaling():
    # The fused call's adapter addresses are kept between calls; every change must still show.
    module = layer()
    plan = module.stream_plan()
    generator = torch.Generator().manual_seed(1)
    lora_a, lora_b = torch.randn(4, 96, generator=generator), torch.randn(80, 4, generator=generator)
    x = torch.randn(1, 96, generator=generator)

    def expected(a, b, scaling):
        return general_forward(module, x) + (x.double() @ a.double().t() @ b.double().t()).float() * scaling

    with torch.no_grad():
        first = dispatch.fused_adapter_forward(plan, x, lora_a, lora_b, 2.0)
        operands = plan.adapter_operands
        torch.testing.assert_close(first, expected(lora_a, lora_b, 2.0), rtol=1e-5, atol=1e-5)
        assert torch.equal(dispatch.fused_adapter_forward(plan, x, lora_a, lora_b, 2.0), first)
        assert plan.adapter_operands is operands  # reused while nothing changed
        lora_b.mul_(-1)  # an optimizer step: same memory, new values
        torch.testing.assert_close(
            dispatch.fused_adapter_forward(plan, x, lora_a, lora_b, 2.0),
            expected(lora_a, lora_b, 2.0),
            rtol=1e-5,
            atol=1e-5,
        )
        torch.testing.assert_close(
            dispatch.fused_adapter_forward(plan, x, lora_a, lora_b, 0.5),
            expected(lora_a, lora_b, 0.5),
            rtol=1e-5,
            atol=1e-5,
        )
        other_a, other_b = torch.randn(4, 96, generator=generator), torch.randn(80, 4, generator=generator)
        torch.testing.assert_close(
            dispatch.fused_adapter_forward(plan, x, other_a, other_b, 0.5),
            expected(other_a, other_b, 0.5),
            rtol=1e-5,
            atol=1e-5,
        )


def test_a_layer_with_a_plan_copies_and_pickles_and_the_copy_builds_its_own():
    module = layer()
    x = torch.randn(1, 96)
    with torch.no_grad():
        expected = module(x)
    twin = copy.deepcopy(module)
    restored = pickle.loads(pickle.dumps(module))
    for other in (twin, restored):
        with torch.no_grad():
            assert torch.equal(other(x), expected)
        assert other.stream_plan().q_ptr == other.weight.data_ptr() != module.weight.data_ptr()


def test_decode_calls_split_over_threads_agree_with_float64(monkeypatch):
    # Test-sized layers run on one thread; force the split so the threaded decode stays covered.
    module = layer(in_features=256, out_features=320)
    plan = module.stream_plan()
    x, grad = torch.randn(2, 256), torch.randn(2, 320)
    threads = torch.get_num_threads()
    monkeypatch.setattr(native, "SINGLE_THREAD_WORK_BYTES", 0)
    torch.set_num_threads(2)
    try:
        out, grad_in = dispatch.one_call_forward(plan, x), dispatch.one_call_grad_input(plan, grad)
    finally:
        torch.set_num_threads(threads)
    assert relative_error(out, float64_forward(x, module.weight, module.weight_scales)) < 1e-5
    expected_grad = float64_grad_input(grad, module.weight, module.weight_scales)
    assert relative_error(grad_in, expected_grad) < 1e-5


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_backward_after_the_weight_storage_is_freed_and_gathered_again(rows):
    # What FSDP2 does between a block's forward and backward: the gathered weight's storage is
    # freed (resized to 0) and later refilled, in new memory, with the same bytes. A kernel that
    # kept the forward's pointer would read whatever the allocator put there meanwhile.
    module = layer(256, 192, seed=4).train()
    x = torch.randn(rows, 256, requires_grad=True)
    grad_out = torch.randn(rows, 192)
    expected = float64_grad_input(grad_out, module.weight, module.weight_scales)
    out = module(x)
    saved = module.weight.detach().clone()
    storage = module.weight.untyped_storage()
    old_pointer = module.weight.data_ptr()
    storage.resize_(0)
    filler = []  # takes over the freed bytes, so the refilled weight lands elsewhere
    while len(filler) < 64 and (not filler or filler[-1].data_ptr() != old_pointer):
        filler.append(torch.full((256, 192), 127, dtype=torch.int8))
    storage.resize_(saved.numel())
    # Refilled through another tensor on the same storage, as FSDP2's all-gather writes it: the
    # weight's own version counter is untouched, so autograd does not object.
    torch.empty(0, dtype=torch.int8).set_(storage, 0, saved.shape, saved.stride()).copy_(saved)
    assert module.weight.data_ptr() != old_pointer
    out.backward(grad_out)
    assert relative_error(x.grad, expected) < 1e-6
