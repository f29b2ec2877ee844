"""Summed next-token loss and accuracy over the answer tokens of a batch."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX


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


def answer_token_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TokenStats:
    """Summed cross-entropy and top-1 hits of the labelled tokens, each predicted from the tokens before it.

    Logits are only computed where a label follows (models with ``logits_to_keep``), which skips
    the vocabulary projection for prompt and padding positions.
    """
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(**inputs).logits[keep]
    logits = logits.float()
    nll = F.cross_entropy(logits, targets, reduction="sum")
    correct = int((logits.detach().argmax(dim=-1) == targets).sum())
    return TokenStats(nll, int(targets.numel()), correct)
