"""recompute_cheap_ops: the same outputs and gradients as the model's own forward, with less saved."""

import copy

import pytest
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

import eetq_lora
from eetq_lora.training.recompute import recompute_cheap_ops
from tests.helpers import TINY_SIZES, tiny_llama, token_batch


def family_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama()
    config = {
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "phi3": Phi3Config,
        "gemma": GemmaConfig,
        "gemma2": Gemma2Config,
        "gemma3": Gemma3TextConfig,
        "granite": GraniteConfig,
        "olmo2": Olmo2Config,
        "smollm3": SmolLM3Config,
    }[family]
    extra = {"pad_token_id": 0} if family in ("phi3", "smollm3") else {}
    if family.startswith("gemma"):
        extra = {"head_dim": 16}
    return AutoModelForCausalLM.from_config(config(**TINY_SIZES, **extra)).eval()


def lora_model(family: str = "llama", dtype: torch.dtype = torch.bfloat16, dropout: float = 0.0):
    model = eetq_lora.quantize_model(family_model(family).to(dtype))
    peft_model = eetq_lora.get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return peft_model.train()


def step(model, ids, seed: int = 0):
    """Loss and the LoRA gradients of one training forward/backward."""
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct storages, other than the model's own weights, autograd keeps after one forward."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in weights:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(storages.values())


# The families the README names: Gemma 1-3, SmolLM3 and the rest.
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "granite", "olmo2", "smollm3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_loss_and_gradients_with_less_saved(family):
    model = lora_model(family)
    twin = copy.deepcopy(model)
    layers = 2
    kinds = [type(m).__name__ for m in twin.modules()]
    norms_and_mlps = sum(name.endswith(("RMSNorm", "MLP")) for name in kinds)
    assert sum(name.endswith("MLP") for name in kinds) == layers
    assert recompute_cheap_ops(twin) == norms_and_mlps
    ids = token_batch()
    loss, grads = step(model, ids)
    twin_loss, twin_grads = step(twin, ids)
    assert torch.equal(twin_loss, loss)
    assert grads.keys() == twin_grads.keys() and len(grads) == (4 if family == "phi3" else 7) * layers * 2  # A and B
    for name, grad in grads.items():
        torch.testing.assert_close(twin_grads[name], grad, rtol=0, atol=0, msg=name)
    assert saved_activation_bytes(twin, ids) < 0.85 * saved_activation_bytes(model, ids)


def test_float32_model_and_lora_dropout_draw_the_same():
    model = lora_model("llama", torch.float32, dropout=0.2)
    twin = copy.deepcopy(model)
    recompute_cheap_ops(twin)
    ids = token_batch()
    loss, grads = step(model, ids, seed=5)
    twin_loss, twin_grads = step(twin, ids, seed=5)
    assert torch.equal(twin_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(twin_grads[name], grad, rtol=0, atol=0, msg=name)


def test_a_trainable_norm_weight_gets_its_gradient():
    model = lora_model("llama", torch.float32)
    twin = copy.deepcopy(model)
    recompute_cheap_ops(twin)
    for m in (model, twin):
        m.get_base_model().model.layers[0].input_layernorm.weight.requires_grad_(True)
    ids = token_batch()
    _, grads = step(model, ids)
    _, twin_grads = step(twin, ids)
    key = next(name for name in grads if "input_layernorm" in name)
    torch.testing.assert_close(twin_grads[key], grads[key], rtol=0, atol=0)


def test_inside_gradient_checkpointing_and_without_autograd():
    model = lora_model("llama")
    twin = copy.deepcopy(model)
    recompute_cheap_ops(twin)
    for m in (model, twin):
        m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_batch()
    loss, grads = step(model, ids)
    twin_loss, twin_grads = step(twin, ids)
    assert torch.equal(twin_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(twin_grads[name], grad, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_undo_and_repeat():
    model = lora_model("llama")
    assert recompute_cheap_ops(model) == 7
    assert recompute_cheap_ops(model) == 0  # already patched
    norm = model.get_base_model().model.norm
    assert "forward" in norm.__dict__
    assert recompute_cheap_ops(model, enable=False) == 7
    assert "forward" not in norm.__dict__ and recompute_cheap_ops(model, enable=False) == 0


def test_other_modules_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.SiLU())
    assert recompute_cheap_ops(model) == 0
