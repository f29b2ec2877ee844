"""Held-out scoring: mean next-token loss and accuracy over answer tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..data.encode import Encoded, collate
from .distributed import DistContext
from .loss import answer_token_stats


@dataclass(frozen=True)
class EvalResult:
    """``loss`` is the mean cross-entropy per answer token (nats); ``accuracy`` the share of answer
    tokens the model ranks first given the true answer so far (teacher-forced)."""

    loss: float
    accuracy: float
    tokens: int
    examples: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    items: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    context: DistContext | None = None,
    lockstep: bool = False,
) -> EvalResult:
    """Score ``items``; under torchrun each process takes every world_size-th item and the sums are combined.

    ``lockstep`` is for a model sharded over the processes, whose every forward gathers weights
    from all of them: each process then runs as many forwards as the one with the most batches,
    the extra ones repeating a batch and counting nothing. The result is the same either way.
    """
    if not items:
        raise ValueError("evaluate got no examples")
    context = context or DistContext()
    was_training = model.training
    model.eval()
    mine = sorted(items[context.rank :: context.world_size], key=lambda item: len(item.input_ids))
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    idle = 0
    if lockstep:
        # Rank 0's share, every world_size-th item from the first, is the largest.
        most_items = -(-len(items) // context.world_size)
        idle = -(-most_items // batch_size) - len(batches)
    nll = tokens = correct = 0.0
    for index, part in enumerate(batches + [list(items[:1])] * idle):
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        stats = answer_token_stats(model, batch)
        if index < len(batches):
            nll += float(stats.nll)
            tokens += stats.tokens
            correct += stats.correct
    nll, tokens, correct = context.sum([nll, tokens, correct], device)
    model.train(was_training)
    return EvalResult(loss=nll / tokens, accuracy=correct / tokens, tokens=int(tokens), examples=len(items))
