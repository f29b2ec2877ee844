"""Tiny models built from config (no downloads) shared by the tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


# The sizes of every tiny test model, whatever its family.
TINY_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(TINY_SIZES, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The same random weights for the same seed, so a model can be rebuilt identically."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def token_batch(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def dequantized_twin(quantized: torch.nn.Module, seed: int = 0) -> LlamaForCausalLM:
    """A float tiny Llama whose linear weights are the dequantized weights of ``quantized``'s EETQ layers."""
    from eetq_lora import EetqLinear

    twin = tiny_llama(seed=seed)
    for name, module in quantized.named_modules():
        if isinstance(module, EetqLinear):
            float_name = name.removesuffix(".base_layer").removesuffix(".quant_linear_module")
            twin.get_submodule(float_name).weight.data = module.dequantize(torch.float32)
    return twin
