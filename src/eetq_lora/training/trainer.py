"""One optimizer step at a time, in one process or many."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..data.encode import Encoded, collate, supervised_tokens
from .config import FinetuneConfig
from .distributed import DistContext
from .loss import answer_token_stats
from .lr import learning_rate
from .schedule import BatchSchedule, micro_batches

MAX_GRAD_NORM = 1.0


class NonFinite(Exception):
    """The training loss or gradient norm of a step is NaN or infinite; the step was not applied."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"the {what} is {value}")


@dataclass
class TrainData:
    """The encoded training examples, the order the steps take them in, and the padding token."""

    items: list[Encoded]
    schedule: BatchSchedule
    pad_id: int


class Trainer:
    """Runs optimizer steps over the schedule; each step's loss is the global mean per answer token.

    Under torchrun without FSDP the model is wrapped in DistributedDataParallel for the forward and
    backward passes; sharded (FSDP2) models are trained as they are.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data: TrainData,
        config: FinetuneConfig,
        context: DistContext,
        device: torch.device,
    ) -> None:
        self.model = model
        self.train_model = model
        if context.enabled and not config.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = optimizer
        self.data = data
        self.answer_tokens = [supervised_tokens(item) for item in data.items]
        self.config = config
        self.context = context
        self.device = device
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all processes."""
        return self.data.schedule.global_batch

    def _gradient_sync(self, last: bool):
        """Combine gradients over processes only in the backward of a step's last micro-batch."""
        if not self.context.enabled:
            return nullcontext()
        if self.config.fsdp:
            # FSDP2 modules have no no_sync(); this flag holds until it is set again.
            self.train_model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.train_model.no_sync()

    def step(self, step: int, stop_requested: Callable[[], bool]) -> tuple[float, int, bool]:
        """Run optimizer step ``step``; returns (loss, tokens processed by all processes, stop agreed).

        ``stop_requested`` is asked after the forward and backward passes, so a Ctrl-C during this
        step stops the run after it. A loss or gradient norm that is NaN or infinite raises
        NonFinite before the update is applied.
        """
        rate = learning_rate(step, self.config.steps, self.config.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        batch_indices = self.data.schedule.global_batch_at(step)
        global_tokens = sum(self.answer_tokens[i] for i in batch_indices)
        nll_sum, tokens = self._accumulate(batch_indices, global_tokens)
        nll_sum, tokens, stop = self.context.sum([nll_sum, tokens, float(stop_requested())], self.device)
        loss = nll_sum / max(1, global_tokens)
        # Under FSDP the gradients are DTensor shards, and the norm is taken over all of them.
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, MAX_GRAD_NORM)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        # Every process has the same loss and norm here, so all of them stop together.
        for what, value in (("training loss", loss), ("gradient norm", norm)):
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFinite(what, value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, int(tokens), stop > 0

    def _accumulate(self, batch_indices: list[int], global_tokens: int) -> tuple[float, int]:
        """Forward and backward this process's micro-batches of a global batch; returns (nll sum, tokens)."""
        context = self.context
        parts = micro_batches(batch_indices, context.world_size, context.rank, self.config.grad_accum)
        nll_sum = 0.0
        tokens = 0
        # DDP and FSDP average gradients over processes; scaling by world/global_tokens makes the update
        # the gradient of (sum of answer-token losses) / (answer tokens in the global batch).
        scale = context.world_size / max(1, global_tokens)
        for index, part in enumerate(parts):
            examples = [self.data.items[i] for i in part]
            batch = {k: v.to(self.device) for k, v in collate(examples, self.data.pad_id).items()}
            with self._gradient_sync(last=index == len(parts) - 1):
                stats = answer_token_stats(self.train_model, batch)
                (stats.nll * scale).backward()
            nll_sum += float(stats.nll.detach())
            tokens += int(batch["attention_mask"].sum())
        return nll_sum, tokens
