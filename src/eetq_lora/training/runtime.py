"""The process a run trains in: its threads, its peak memory, the versions it ran with, rank 0's decisions."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable

import torch

from ..errors import UserError
from .distributed import DistContext


def configure_threads(requested: int | None, context: DistContext) -> int:
    """Use ``requested`` threads; else share torch's default (one per core) among this machine's processes."""
    if requested:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ and context.local_world_size > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // context.local_world_size))
    return torch.get_num_threads()


def warn_if_busy(log: Callable[[str], None]) -> None:
    """Say so when other programs already keep the CPUs busy: threads that wait on each other then
    slow to a crawl, and one thread per process is usually much faster."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    cores = os.cpu_count() or 1
    if load >= 0.75 * cores:
        log(
            f"Note: this machine is already busy (load {load:.1f} on {cores} CPUs); "
            "if training crawls, pass --threads 1."
        )


def peak_memory_bytes() -> int:
    """This process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def versions() -> dict[str, str]:
    """The versions of eetq-lora and of the libraries it trains with."""
    import peft
    import transformers

    from .._version import __version__

    return {
        "eetq_lora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def on_main(context: DistContext, decide: Callable[[], object]) -> object:
    """Run ``decide()`` on rank 0 only and return its result on every process; its UserError is raised on all."""
    if not context.enabled:
        return decide()
    import torch.distributed as dist

    box: list = [None]
    error: UserError | None = None
    if context.is_main:
        try:
            box[0] = ("ok", decide())
        except UserError as caught:
            error = caught
            box[0] = ("error", str(caught))
        except Exception:
            box[0] = ("error", "process 0 could not prepare --out; see its error")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value
