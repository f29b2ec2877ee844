"""Summed next-token loss and accuracy over the answer tokens of a batch."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.encode import IGNORE_INDEX
from .linear_cross_entropy import linear_cross_entropy

# Causal LMs whose forward computes logits = lm_head(decoder(...).last_hidden_state) and nothing more.
PLAIN_HEAD_MODELS = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"}
)


@dataclass
class TokenStats:
    """Sums over a batch: ``nll`` keeps its graph for backward; ``tokens``/``correct`` are counts."""

    nll: torch.Tensor
    tokens: int
    correct: int


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model
    while hasattr(base, "module"):  # DistributedDataParallel
        base = base.module
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _is_sharded(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    # FSDP2 (fully_shard) gathers a unit's weights only inside that unit's forward, and the root
    # unit's forward must run first: the head's weight is a shard anywhere else.
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(model, FSDPModule) or isinstance(head.weight, DTensor)


def _decoder_and_plain_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    # Only where the logits are exactly lm_head(decoder output): no soft-capping or logit scale,
    # a bias-free float head, and no DistributedDataParallel wrapper or FSDP2 sharding (the
    # model's own forward must run).
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base).__name__ not in PLAIN_HEAD_MODELS:
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or _is_sharded(model, head):
        return None
    return base.get_decoder(), head


def answer_token_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TokenStats:
    """Summed cross-entropy and top-1 hits of the labelled tokens, each predicted from the tokens before it.

    Logits are only computed where a label follows. For the models in ``PLAIN_HEAD_MODELS`` the
    vocabulary projection and the loss run in chunks (``linear_cross_entropy``), so the logits
    of the whole batch never exist at once; other models, and models sharded with FSDP2, go
    through their own forward (with ``logits_to_keep`` where they take it).
    """
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    parts = _decoder_and_plain_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[keep]
        nll, correct = linear_cross_entropy(hidden, head.weight, targets)
        return TokenStats(nll, int(targets.numel()), int(correct))
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(**inputs).logits[keep]
    logits = logits.float()
    nll = F.cross_entropy(logits, targets, reduction="sum")
    correct = int((logits.detach().argmax(dim=-1) == targets).sum())
    return TokenStats(nll, int(targets.numel()), correct)
