"""A quantized tiny Llama with two random LoRA adapters, shared by the LoRA tests."""

import torch
from peft import LoraConfig

import eetq_lora
from tests.helpers import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def randomize_lora(model, seed):
    """Give every LoRA parameter of ``model`` small random values (seeded), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def quantized_with_two_adapters():
    """A quantized tiny Llama with random adapters ``default`` (r=4) and ``other`` (r=2), in eval mode."""
    model = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), LoraConfig(r=4, target_modules=TARGETS))
    eetq_lora.add_adapter(model, "other", LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS))
    randomize_lora(model, seed=1)
    return model.eval()
