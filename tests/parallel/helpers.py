"""The LoRA model, per-rank batches and loss shared by the FSDP2 and ZeRO-3 tests."""

from __future__ import annotations

import torch
from peft import LoraConfig

import eetq_lora
from tests.helpers import PROJECTIONS, VOCAB, tiny_llama


def lora_model(dtype=torch.float32, **sizes):
    """A quantized tiny Llama (width 128) with a random LoRA adapter on every projection, in train mode."""
    model = eetq_lora.quantize_model(tiny_llama(seed=0, hidden_size=128, intermediate_size=256, **sizes))
    # init_lora_weights=False: B is random too, so both A and B get non-zero gradients.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    peft_model = eetq_lora.get_peft_model(model.to(dtype), config)
    peft_model.train()
    return peft_model


def rank_batch(rank: int, tokens: int) -> torch.Tensor:
    """Rank ``rank``'s batch of ``tokens`` tokens: row 0 the input ids, row 1 the targets."""
    generator = torch.Generator().manual_seed(1000 * tokens + rank)
    return torch.randint(0, VOCAB, (2, tokens), generator=generator)


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    # Row 0 is the input, row 1 the target of every position: with a single token per rank
    # (M=1, the decode-plan path) there is still a loss, unlike a shifted causal LM loss.
    logits = model(input_ids=batch[:1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), batch[1])


def churn_allocator() -> None:
    # Reuse freed memory between forward and backward, as a real step's other allocations would:
    # a kernel reading a freed weight then reads these bytes instead.
    junk = [torch.full((128, 256 + 64 * i), 99, dtype=torch.int8) for i in range(16)]
    junk += [torch.full((256, 128), 77, dtype=torch.int8) for _ in range(16)]
    del junk
