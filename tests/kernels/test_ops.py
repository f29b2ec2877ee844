"""The int8 matmul as torch.library operators: registered correctly, and torch.compile traces models in one graph."""

import pytest
import torch
import torch._dynamo
from peft import LoraConfig

import eetq_lora
from eetq_lora.kernels.dispatch import matmul_forward, matmul_grad_input
from eetq_lora.kernels.ops import int8_matmul, int8_matmul_grad_input, traced_int8_linear
from tests.helpers import tiny_llama
from tests.kernels.helpers import int8_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_operators_pass_torch_library_checks(dtype, rows):
    qweight, scales = int8_weight(96, 80)
    x = torch.randn(rows, 96).to(dtype).requires_grad_()
    torch.library.opcheck(int8_matmul, (x, qweight, scales))
    torch.library.opcheck(int8_matmul_grad_input, (torch.randn(rows, 80).to(dtype), qweight, scales))


def test_operators_return_the_dispatchers_results():
    qweight, scales = int8_weight(96, 80)
    x, grad = torch.randn(7, 96), torch.randn(7, 80)
    assert torch.equal(int8_matmul(x, qweight, scales), matmul_forward(x, qweight, scales))
    assert torch.equal(int8_matmul_grad_input(grad, qweight, scales), matmul_grad_input(grad, qweight, scales))
    x.requires_grad_()
    int8_matmul(x, qweight, scales).backward(grad)
    assert torch.equal(x.grad, matmul_grad_input(grad, qweight, scales))


def test_traced_linear_keeps_leading_dimensions_and_bias():
    qweight, scales = int8_weight(96, 80)
    bias = torch.randn(80)
    x = torch.randn(2, 3, 96)
    expected = (matmul_forward(x.reshape(6, 96), qweight, scales) + bias).reshape(2, 3, 80)
    assert torch.equal(traced_int8_linear(x, qweight, scales, bias), expected)


def lora_model():
    torch.manual_seed(0)
    model = eetq_lora.quantize_model(tiny_llama())
    peft_model = eetq_lora.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return peft_model


def test_a_compiled_training_step_is_one_graph_and_matches_eager():
    model = lora_model().train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = model(input_ids=ids, labels=ids).loss
    eager.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(input_ids=ids, labels=ids).loss
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_greedy_decoding_with_a_static_cache_matches_eager():
    from transformers import CompileConfig

    model = lora_model().eval()
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles decoding on CUDA only by default
    assert model.get_base_model().hf_quantizer.is_compileable
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        eager = model.generate(input_ids=prompt, **options)
        compiled = model.generate(
            input_ids=prompt, cache_implementation="static", compile_config=compile_config, **options
        )
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decoding step was compiled
    assert not torch._dynamo.utils.counters["graph_break"]
