"""Resumable training state in OUT/checkpoint: adapter, optimizer, RNG and progress, published atomically.

One process or DDP: rank 0 writes the adapter, ``optimizer.pt`` and ``rng.pt``. A model sharded
with FSDP2: every process writes its shards of the trainable tensors, the optimizer state and its
own RNG into ``training_state/`` (``torch.distributed.checkpoint``), and the adapter is gathered
into the same PEFT files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import publish_folder

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
SHARDED_STATE_DIR = "training_state"


def checkpoint_path(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR


def save_checkpoint(out: Path, peft_model, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write the checkpoint to a temporary folder and swap it in: a crash never leaves a half checkpoint."""

    def build(folder: Path) -> None:
        peft_model.save_pretrained(folder)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / "rng.pt")
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    return publish_folder(build, checkpoint_path(out), if_exists="replace")


def save_sharded_checkpoint(out: Path, peft_model, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """``save_checkpoint`` for a model sharded over the processes; every process calls it."""
    import torch.distributed as dist

    from ..parallel.checkpoint import publish_folder_together, save_sharded_adapter, write_training_state

    def build(folder: Path) -> None:
        save_sharded_adapter(peft_model, folder)
        write_training_state(folder / SHARDED_STATE_DIR, peft_model, optimizer)
        if dist.get_rank() == 0:
            (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    return publish_folder_together(build, checkpoint_path(out))


def restore_sharded_state(out: Path, peft_model, optimizer: torch.optim.Optimizer) -> None:
    """Load the trainable tensors, optimizer and this process's RNG saved by ``save_sharded_checkpoint``."""
    from ..errors import UserError
    from ..parallel.checkpoint import load_training_state

    folder = checkpoint_path(out) / SHARDED_STATE_DIR
    if not folder.is_dir():
        raise UserError(
            f"{checkpoint_path(out)} was saved by a run without --fsdp (it has no {SHARDED_STATE_DIR}/); "
            "resume it without --fsdp"
        )
    load_training_state(folder, peft_model, optimizer)


def read_state(out: Path) -> dict | None:
    """The progress record of OUT's checkpoint, or None if there is none."""
    path = checkpoint_path(out) / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def restore_optimizer_and_rng(out: Path, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Load the optimizer and RNG states saved by ``save_checkpoint`` (tensors only: weights_only=True)."""
    folder = checkpoint_path(out)
    state = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state)
    rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
