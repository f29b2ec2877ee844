"""Resumable training state in OUT/checkpoint: adapter, optimizer, RNG and progress, published atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import publish_folder

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"


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
