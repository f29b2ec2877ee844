"""Run a function on N gloo ranks (separate processes, as torchrun would) and collect what each returns."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args):
    """``fn(rank, world_size, *args)`` on each rank; returns their results (tensors, dicts, lists, numbers)."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        except Exception as error:
            errors = sorted(Path(out_dir).glob("*.error"))
            detail = "\n".join(path.read_text() for path in errors)
            raise AssertionError(f"a rank failed:\n{detail or error}") from error
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
