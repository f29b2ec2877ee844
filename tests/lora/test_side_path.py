"""The one-node LoRA side path: PEFT's results, and the input saved once in its own dtype."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

import eetq_lora
from eetq_lora.lora.side_path import lora_side_path
from tests.helpers import tiny_llama, token_batch


def peft_ops(x, weight_a, weight_b, scaling, out_dtype):
    """PEFT's side path as plain autograd ops: cast, lora_A, lora_B, cast back, scale."""
    return F.linear(F.linear(x.to(weight_a.dtype), weight_a), weight_b).to(out_dtype) * scaling


def leaves(dtype, shape=(2, 5, 24), rank=4, out=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
    weight_a = torch.randn(rank, shape[-1], generator=generator).requires_grad_()
    weight_b = torch.randn(out, rank, generator=generator).requires_grad_()
    return x, weight_a, weight_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_gradients_match_peft_ops(dtype):
    x, weight_a, weight_b = leaves(dtype)
    x2, weight_a2, weight_b2 = (t.detach().clone().requires_grad_() for t in (x, weight_a, weight_b))
    ours = lora_side_path(x, weight_a, weight_b, 0.5, dtype)
    expected = peft_ops(x2, weight_a2, weight_b2, 0.5, dtype)
    assert ours.dtype == dtype and torch.equal(ours, expected)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    expected.backward(grad)
    for got, want in ((x.grad, x2.grad), (weight_a.grad, weight_a2.grad), (weight_b.grad, weight_b2.grad)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_requested_gradients_are_computed():
    x, weight_a, weight_b = leaves(torch.bfloat16)
    x.requires_grad_(False)
    lora_side_path(x, weight_a, weight_b, 2.0, torch.bfloat16).sum().backward()
    assert x.grad is None and weight_a.grad is not None and weight_b.grad is not None
    with torch.no_grad():
        out = lora_side_path(x, weight_a, weight_b, 2.0, torch.bfloat16)
    assert out.grad_fn is None


def saved_tensors_of(fn):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved


def test_saves_the_input_itself_not_a_float32_copy():
    x, weight_a, weight_b = leaves(torch.bfloat16, shape=(4, 64, 96))
    _, saved = saved_tensors_of(lambda: lora_side_path(x, weight_a, weight_b, 1.0, torch.bfloat16))
    activation_sized = [t for t in saved if t.numel() == x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].dtype == torch.bfloat16
    assert activation_sized[0].data_ptr() == x.data_ptr()
    _, peft_saved = saved_tensors_of(lambda: peft_ops(x, weight_a, weight_b, 1.0, torch.bfloat16))
    assert any(t.numel() == x.numel() and t.dtype == torch.float32 for t in peft_saved)


def randomize_lora_b(model):
    # B starts at zero, which would leave A's gradient zero and the comparison empty.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)


def saved_bytes(model, tokens):
    def unique_bytes(tensors):
        storages = {}
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    model.train()
    out, saved = saved_tensors_of(lambda: model(tokens, labels=tokens).loss)
    out.backward()
    return unique_bytes(saved)


def test_a_bf16_model_keeps_less_for_backward_than_peft_and_the_same_gradients():
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    base = eetq_lora.quantize_model(tiny_llama(hidden_size=128, intermediate_size=256).to(torch.bfloat16))
    ours = eetq_lora.get_peft_model(base, lora)
    randomize_lora_b(ours)
    tokens = token_batch(batch=2, length=32)
    our_bytes = saved_bytes(ours, tokens)
    # The same model with the generic (PEFT) side path, as a reference for memory and gradients.
    reference = eetq_lora.get_peft_model(
        eetq_lora.quantize_model(tiny_llama(hidden_size=128, intermediate_size=256).to(torch.bfloat16)), lora
    )
    reference.load_state_dict(ours.state_dict())
    for module in reference.modules():
        if isinstance(module, eetq_lora.EetqLoraLinear):
            module._plain_adapter = lambda *adapters: False
    reference_bytes = saved_bytes(reference, tokens)
    assert our_bytes < 0.8 * reference_bytes
    for (name, ours_param), (_, ref_param) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):
        if ours_param.requires_grad:
            assert ours_param.grad is not None and ours_param.grad.abs().sum() > 0, name
            torch.testing.assert_close(ours_param.grad, ref_param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_dropout_in_training_matches_the_generic_path():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3)
    models = []
    for use_side_path in (True, False):
        model = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), lora)
        randomize_lora_b(model)
        if models:
            model.load_state_dict(models[0].state_dict())
        for module in model.modules():
            if isinstance(module, eetq_lora.EetqLoraLinear) and not use_side_path:
                module._plain_adapter = lambda *adapters: False
        model.train()
        torch.manual_seed(3)  # the same dropout masks in both
        model(token_batch(), labels=token_batch()).loss.backward()
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        if a.requires_grad:
            assert a.grad is not None and a.grad.abs().sum() > 0, name
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
