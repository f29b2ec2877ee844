"""Beyond PEFT's EETQ layer: mixed batches, adapter arithmetic, memory features, lora_bias."""

import pytest
import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from peft import get_peft_model as peft_get_peft_model

import eetq_lora
from eetq_lora import EetqLoraLinear
from tests.helpers import dequantized_twin, tiny_llama, token_batch
from tests.lora.helpers import TARGETS, quantized_with_two_adapters, randomize_lora


def dequantized_float_twin(quantized: PeftModel) -> PeftModel:
    """The same adapters, with PEFT's own LoRA layers, on a float model holding the dequantized weights."""
    twin = peft_get_peft_model(dequantized_twin(quantized.get_base_model()), LoraConfig(r=4, target_modules=TARGETS))
    twin.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS))
    result = twin.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    assert not result.unexpected_keys
    return twin.eval()


# --- mixed-adapter batches -----------------------------------------------------------------


def test_mixed_adapter_batch_through_the_model_equals_each_sample_alone():
    model = quantized_with_two_adapters()
    ids = token_batch(batch=4)
    names = ["default", "__base__", "other", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i : i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_generate_matches_single_adapter_generate():
    model = quantized_with_two_adapters()
    ids = token_batch(batch=2, length=6)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["other", "default"], **settings)
        model.set_adapter("other")
        first = model.generate(input_ids=ids[:1], **settings)
        model.set_adapter("default")
        second = model.generate(input_ids=ids[1:], **settings)
    assert torch.equal(mixed[:1], first) and torch.equal(mixed[1:], second)


def test_mixed_batch_matches_peft_on_the_dequantized_float_model():
    model = quantized_with_two_adapters()
    twin = dequantized_float_twin(model)
    ids = token_batch(batch=3)
    names = ["other", "default", "__base__"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, adapter_names=names).logits,
            twin(input_ids=ids, adapter_names=names).logits,
            rtol=1e-4,
            atol=1e-4,
        )


# --- adapter arithmetic and management -------------------------------------------------------


# Every combination type PEFT 0.21 offers.
COMBINATIONS = ["svd", "linear", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
COMBINATIONS += ["magnitude_prune", "magnitude_prune_svd", "cat"]


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_add_weighted_adapter_matches_peft_on_floats(combination):
    model = quantized_with_two_adapters()
    twin = dequantized_float_twin(model)
    extra = {"density": 0.5} if combination.startswith(("ties", "dare", "magnitude")) else {}
    if combination in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        # these need equal ranks: combine an adapter with itself at two weights
        adapters, weights = ["default", "default"], [0.25, 0.5]
    else:
        adapters, weights = ["default", "other"], [0.7, 0.3]
    for peft_model in (model, twin):
        torch.manual_seed(0)  # DARE prunes at random: the same draws for both
        peft_model.add_weighted_adapter(adapters, weights, "mixed", combination_type=combination, **extra)
        peft_model.set_adapter("mixed")
    ours = {k: v for k, v in model.state_dict().items() if ".mixed." in k}
    theirs = {k: v for k, v in twin.state_dict().items() if ".mixed." in k}
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_switch_disable_and_delete_adapters():
    model = quantized_with_two_adapters()
    ids = token_batch()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.set_adapter("other")
        other = model(input_ids=ids).logits
        model.set_adapter("default")
        default = model(input_ids=ids).logits
        assert not torch.equal(other, default) and not torch.equal(default, base)
        model.delete_adapter("other")
        assert list(model.peft_config) == ["default"]
        assert all("other" not in m.lora_A for m in model.modules() if isinstance(m, EetqLoraLinear))
        torch.testing.assert_close(model(input_ids=ids).logits, default)


# --- training-memory features ----------------------------------------------------------------


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    ids = token_batch()
    grads = []
    for checkpointing in (False, True):
        base = eetq_lora.quantize_model(tiny_llama())
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            base.enable_input_require_grads()
        torch.manual_seed(5)
        model = eetq_lora.get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(lora_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-5, atol=1e-6)


def test_prepare_model_for_kbit_training_keeps_the_int8_base_and_trains():
    base = eetq_lora.quantize_model(tiny_llama())
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    assert base.is_gradient_checkpointing
    layer = base.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.int8 and layer.weight_scales.dtype == torch.float16
    model = eetq_lora.get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS))
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(lora_grads(model)) == 12


def test_torch_compile_matches_eager():
    model = quantized_with_two_adapters()
    ids = token_batch()
    compiled = torch.compile(model.get_base_model())
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-4, atol=1e-4)


# --- lora_bias ----------------------------------------------------------------------------------


def test_lora_bias_trains_saves_and_loads(tmp_path):
    base = eetq_lora.quantize_model(tiny_llama(attention_bias=True))
    model = eetq_lora.get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    randomize_lora(model, seed=3)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64)
    expected = (
        layer.base_layer(x).float() + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    )
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_B["default"].bias.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = eetq_lora.load_adapter(eetq_lora.quantize_model(tiny_llama(attention_bias=True)), tmp_path)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
