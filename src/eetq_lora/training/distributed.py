"""One process or many (torchrun): rank bookkeeping, the process group and the few collectives we use."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def context_from_env() -> DistContext:
    """The process's place in a torchrun job, from its environment (a single process without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistContext(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def check_sharding_possible(context: DistContext) -> None:
    """Raise a UserError unless this process is one of two or more torchrun processes, which FSDP needs."""
    from ..errors import UserError

    if context.world_size < 2:
        launched = "one torchrun process" if "WORLD_SIZE" in os.environ else "a plain process (no torchrun)"
        raise UserError(
            f"--fsdp shards the model over several processes, but this is {launched}; start it with "
            "torchrun --nproc-per-node N -m eetq_lora finetune --fsdp ... (N at least 2), or leave out --fsdp"
        )


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group if there is one: NCCL on GPUs, gloo on CPUs."""
    context = context_from_env()
    if context.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return context


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
