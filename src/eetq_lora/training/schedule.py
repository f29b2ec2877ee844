"""Which examples each optimizer step sees: fixed by the seed, independent of how many processes share the work."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DataError

# Global batches are formed inside groups of this many, sorted by length, so each batch pads little.
LENGTH_GROUP = 8


class BatchSchedule:
    """Global batches of ``global_batch`` example indices per step, epoch after epoch.

    Each epoch shuffles the examples with ``seed + epoch``, sorts each run of
    ``LENGTH_GROUP * global_batch`` of them by length, cuts that into global batches and
    shuffles their order. A last partial batch is dropped, so every step weighs the same.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int) -> None:
        if global_batch <= 0:
            raise ValueError(f"global batch must be positive, got {global_batch}")
        if len(lengths) < global_batch:
            raise DataError(
                f"the training split has {len(lengths)} example(s), fewer than one global batch of {global_batch} "
                "(batch size x grad accumulation x processes); use more data or a smaller --batch-size/--grad-accum"
            )
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = len(lengths) // global_batch
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches_of_epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        usable = order[: self.steps_per_epoch * self.global_batch]
        group = LENGTH_GROUP * self.global_batch
        batches = []
        for start in range(0, len(usable), group):
            chunk = sorted(usable[start : start + group], key=lambda i: self.lengths[i])
            pieces = [chunk[i : i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
            for index in torch.randperm(len(pieces), generator=generator).tolist():
                batches.append(pieces[index])
        return batches

    def global_batch_at(self, step: int) -> list[int]:
        """The example indices of optimizer step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._batches_of_epoch(epoch))
        return self._epoch[1][within]


def micro_batches(global_batch: Sequence[int], world_size: int, rank: int, grad_accum: int) -> list[list[int]]:
    """This process's ``grad_accum`` micro-batches of a global batch (contiguous slices, so similar lengths)."""
    size, remainder = divmod(len(global_batch), world_size * grad_accum)
    if remainder:
        raise ValueError(
            f"a global batch of {len(global_batch)} does not split into {world_size} x {grad_accum} micro-batches"
        )
    return [
        list(global_batch[(accum * world_size + rank) * size : (accum * world_size + rank + 1) * size])
        for accum in range(grad_accum)
    ]
