"""A run's resumable training state: the ``checkpoint/`` folder of its staging folder (see ``run_folder``).

``checkpoint/`` holds the adapter, optimizer, RNG and progress, published atomically. One process
or DDP: rank 0 writes the adapter, ``optimizer.pt`` and ``rng.pt``. A model sharded with FSDP2:
every process writes its shards of the trainable tensors, the optimizer state and its own RNG into
``training_state/`` (``torch.distributed.checkpoint``), and the adapter is gathered into the same
PEFT files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import publish_folder
from ..errors import UserError
from .run_folder import RUN_CONFIG, STATE_FILE, checkpoint_path

SHARDED_STATE_DIR = "training_state"


def _write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _publish(fill, run_folder: Path, run_record: dict | None, publish) -> Path:
    """Publish ``run_folder/checkpoint`` filled by ``fill(folder)``; with ``run_record``, ``run_folder`` itself."""
    if run_record is None:
        return publish(fill, checkpoint_path(run_folder))

    def fill_run(folder: Path) -> None:
        if _rank() == 0:
            (folder / RUN_CONFIG).write_text(json.dumps(run_record, indent=2) + "\n")
        fill(checkpoint_path(folder))

    return publish(fill_run, Path(run_folder))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_checkpoint(
    run_folder: Path, peft_model, optimizer: torch.optim.Optimizer, state: dict, run_record: dict | None = None
) -> Path:
    """Replace ``run_folder/checkpoint`` whole: a crash never leaves a half checkpoint.

    ``run_record`` marks a run's first checkpoint: ``run_folder`` is then published with the record
    as ``run_config.json`` and the checkpoint in one step, so it never exists without either.
    """

    def fill(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        peft_model.save_pretrained(folder)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / "rng.pt")
        _write_state(folder, state)

    return _publish(fill, run_folder, run_record, lambda build, dest: publish_folder(build, dest, if_exists="replace"))


def save_sharded_checkpoint(
    run_folder: Path, peft_model, optimizer: torch.optim.Optimizer, state: dict, run_record: dict | None = None
) -> Path:
    """``save_checkpoint`` for a model sharded over the processes; every process calls it."""
    from ..parallel.checkpoint import publish_folder_together, save_sharded_adapter, write_training_state

    def fill(folder: Path) -> None:
        save_sharded_adapter(peft_model, folder)
        write_training_state(folder / SHARDED_STATE_DIR, peft_model, optimizer)
        if _rank() == 0:
            _write_state(folder, state)

    return _publish(fill, run_folder, run_record, publish_folder_together)


def restore_sharded_state(run_folder: Path, peft_model, optimizer: torch.optim.Optimizer) -> None:
    """Load the trainable tensors, optimizer and this process's RNG saved by ``save_sharded_checkpoint``."""
    from ..parallel.checkpoint import load_training_state

    folder = checkpoint_path(run_folder) / SHARDED_STATE_DIR
    if not folder.is_dir():
        raise UserError(
            f"{checkpoint_path(run_folder)} was saved by a run without --fsdp (it has no {SHARDED_STATE_DIR}/); "
            "resume it without --fsdp"
        )
    load_training_state(folder, peft_model, optimizer)


def restore_optimizer_and_rng(run_folder: Path, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Load the optimizer and RNG states saved by ``save_checkpoint`` (tensors only: weights_only=True)."""
    folder = checkpoint_path(run_folder)
    state = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state)
    rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
