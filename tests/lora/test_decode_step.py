"""The one-call CPU decode step of EetqLoraLinear: PEFT's result, and only where it applies."""

import pytest
import torch
from peft import LoraConfig

import eetq_lora
import eetq_lora.quant.linear as linear_module
from eetq_lora.kernels import cpu_library, dispatch
from tests.helpers import tiny_llama

pytestmark = pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")


def lora_layer(dtype=torch.float32, **config):
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_dropout": 0.0, **config}
    model = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama().to(dtype)), LoraConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model, model.base_model.model.model.layers[0].self_attn.q_proj


def general_path(layer, x):
    layer._decode_step = lambda x: None
    try:
        return layer(x)
    finally:
        del layer._decode_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 64)])
def test_matches_the_general_path(monkeypatch, dtype, shape):
    model, layer = lora_layer(dtype)
    model.eval()
    x = torch.randn(*shape).to(dtype)
    calls = []
    original = dispatch.fused_adapter_forward
    monkeypatch.setattr(linear_module, "fused_adapter_forward", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        fast = layer(x)
        expected = general_path(layer, x)
    assert calls and fast.dtype == expected.dtype == dtype and fast.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    else:
        # The adapter's float32 sums may differ in their last bit from torch's GEMM, so a result
        # can round to the neighbouring bfloat16/float16; anything more is a real difference.
        torch.testing.assert_close(fast, expected, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=1e-3)
        assert (fast == expected).float().mean() > 0.9


def test_whole_model_generation_is_unchanged():
    model, _ = lora_layer(torch.bfloat16, target_modules="all-linear")
    model.eval()
    prompt = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        fast = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        for module in model.modules():
            if isinstance(module, eetq_lora.EetqLoraLinear):
                module._decode_step = lambda x: None
        general = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast, general)


def test_steps_aside_where_it_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(linear_module, "fused_adapter_forward", lambda *a: calls.append(1))  # returns None
    model, layer = lora_layer()
    x = torch.randn(1, 64)
    model.train()
    layer(x)  # training
    with torch.no_grad():
        layer(x, adapter_names=["default"])  # mixed-adapter batches
        with model.disable_adapter():
            layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    dropout_model, dropout_layer = lora_layer(lora_dropout=0.5)
    dropout_model.train()
    with torch.no_grad():
        dropout_layer(x)  # live dropout
    bias_model, bias_layer = lora_layer(lora_bias=True)
    with torch.no_grad():
        bias_layer(x)
    model.train()
    with torch.no_grad():
        layer(x)  # a training-mode forward without autograd (a checkpointed first pass)
    assert calls == []


def test_the_kernel_declines_anything_that_needs_a_gradient():
    model, layer = lora_layer()
    base = layer.base_layer
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(1, 64)
    plan = base.stream_plan()
    step = dispatch.fused_adapter_forward
    assert lora_a.requires_grad and step(plan, x, lora_a, lora_b, 2.0) is None
    with torch.no_grad():
        assert step(plan, x, lora_a, lora_b, 2.0) is not None
        assert step(plan, x.double(), lora_a, lora_b, 2.0) is None  # float64
        assert step(plan, torch.randn(4, 64), lora_a, lora_b, 2.0) is None  # M >= 4
        assert step(plan, x, lora_a.bfloat16(), lora_b, 2.0) is None
        assert step(plan, x, lora_a[:, :32].contiguous(), lora_b, 2.0) is None  # an adapter of another layer's shape


def test_steps_aside_for_adapters_it_cannot_fuse(monkeypatch):
    calls = []
    monkeypatch.setattr(linear_module, "fused_adapter_forward", lambda *a: calls.append(1))  # returns None
    model, layer = lora_layer()
    model.eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer._active_adapter = ["default", "default"]  # two active adapters
        layer(x)
        layer._active_adapter = "other"  # an adapter that has no weights in this layer
        assert torch.equal(layer(x), layer.base_layer(x))
        layer._active_adapter = "default"
        layer.cast_input_dtype_enabled = False  # PEFT's switch for the adapter's input cast
        layer(x)
    assert calls == []


def test_a_decode_call_reads_no_attribute_through_module_getattr(monkeypatch):
    # README: the decode step makes few Python calls; nn.Module.__getattr__ is one per lookup.
    model, layer = lora_layer(torch.bfloat16, target_modules="all-linear")
    model.eval()
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.no_grad():
        expected = general_path(layer, x)
        looked_up = []
        original = torch.nn.Module.__getattr__
        monkeypatch.setattr(
            torch.nn.Module, "__getattr__", lambda module, name: looked_up.append(name) or original(module, name)
        )
        out = layer(x)
    assert looked_up == []
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-3)


def test_hooks_on_the_base_layer_and_the_adapter_run_in_every_mode():
    # The fused paths read weights instead of calling modules; a hook must still take effect.
    model, layer = lora_layer()
    x = torch.randn(1, 64)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        plain = layer(x)
    delta = plain - base_out
    shift = layer.base_layer.register_forward_hook(lambda module, args, out: out + 1.0)
    silence = layer.lora_A["default"].register_forward_pre_hook(lambda module, args: (torch.zeros_like(args[0]),))
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), base_out + 1.0)
    silence.remove()
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), base_out + 1.0 + delta)
    shift.remove()


def test_a_forward_replaced_on_the_instance_is_called():
    # accelerate's hooks wrap module.forward on the instance (no torch hook): its offloading keeps
    # the real weights elsewhere and puts them in place only for the call.
    model, layer = lora_layer()
    model.eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        expected = layer(x)
    lora_A = layer.lora_A["default"]
    real_weight = lora_A.weight.detach().clone()
    class_forward = type(lora_A).forward

    def forward_with_loaded_weight(x):
        with torch.no_grad():
            lora_A.weight.copy_(real_weight)
        return class_forward(lora_A, x)

    with torch.no_grad():
        lora_A.weight.zero_()  # a placeholder until the wrapped forward loads it
    lora_A.forward = forward_with_loaded_weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


def test_accelerate_cpu_offload_gives_the_same_logits():
    accelerate = pytest.importorskip("accelerate")
    model, _ = lora_layer(target_modules="all-linear")
    # Offloading keeps the state dict's tensors and puts them back as they are: the plain layout.
    eetq_lora.set_checkpoint_layout(model, "plain")
    ids = torch.tensor([[5, 9, 13]])
    expected = {}
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            expected[training] = model(input_ids=ids).logits
    accelerate.cpu_offload(model.base_model.model, execution_device=torch.device("cpu"))
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected[training])


def test_a_global_forward_hook_disables_the_fused_call(monkeypatch):
    model, layer = lora_layer()
    model.eval()
    calls = []
    original = dispatch.fused_adapter_forward
    monkeypatch.setattr(linear_module, "fused_adapter_forward", lambda *a: calls.append(1) or original(*a))
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(module))
    try:
        with torch.no_grad():
            layer(torch.randn(1, 64))
    finally:
        handle.remove()
    assert not calls and layer.base_layer in seen and layer.lora_A["default"] in seen
