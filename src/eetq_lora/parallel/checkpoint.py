"""Saving a sharded run: the LoRA adapter as ordinary PEFT files, and the training state to resume from.

``save_sharded_adapter`` gathers only the tensors PEFT saves for an adapter (each rank holds a shard of
them under FSDP2) and writes the files ``PeftModel.save_pretrained`` writes for an unsharded
model. The int8 base is never gathered. ``save_training_state``/``load_training_state`` keep the
trainable parameters, the optimizer and each rank's RNG with ``torch.distributed.checkpoint``:
every rank writes its own shards into one folder, and a run with the same sharding resumes
bit for bit. Each function is a collective: every rank of the process group calls it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import publish_folder, write_with_atomic
from ..errors import UserError

# PEFT writes a model card next to the adapter; it holds nothing a loader needs.
_MODEL_CARD = "README.md"
_RNG_KEY = "rng"


class TrainingStateError(UserError, ValueError):
    """A training-state folder cannot be loaded into this run; the message says why and what to do."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def _local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # The keys of model.state_dict() without running EetqLinear's state-dict packing of the base.
    state = {name: parameter.detach() for name, parameter in model.named_parameters()}
    state.update(model.named_buffers())
    return state


def gather_adapter_state(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``adapter_name``, whole on every rank, under the model's own parameter names.

    Only these tensors are gathered; every rank must call it (it all-gathers shards).
    """
    from peft.utils import get_peft_model_state_dict

    local = _local_state(model)
    picked = get_peft_model_state_dict(model, state_dict=local, adapter_name=adapter_name)
    picked_ids = {id(tensor) for tensor in picked.values()}
    names = [name for name, tensor in local.items() if id(tensor) in picked_ids]
    if len(names) != len(picked):
        raise NotImplementedError(
            f"adapter {adapter_name!r} saves tensors that are not parameters of the model; "
            "gather the model whole and call save_pretrained instead"
        )
    # Same order on every rank (named_parameters order), so the all-gathers pair up.
    return {name: _full(local[name]) for name in names}


def save_sharded_adapter(model: nn.Module, folder: str | os.PathLike, adapter_names: list[str] | None = None) -> Path:
    """Write ``model``'s adapters into ``folder`` as ``save_pretrained`` would for the unsharded model.

    ``adapter_config.json`` and ``adapter_model.safetensors`` (in a subfolder for adapters other
    than "default") are written by rank 0, each file atomically; PEFT's README.md model card is
    not, and other files in ``folder`` are left alone. Works on a sharded or whole model, in one
    process or many; every rank calls it and returns once the files are there.
    """
    folder = Path(folder)
    names = list(adapter_names or model.peft_config.keys())
    state: dict[str, torch.Tensor] = {}
    for name in names:
        state.update(gather_adapter_state(model, name))
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".adapter.", dir=folder) as scratch:
            model.save_pretrained(scratch, selected_adapters=names, state_dict=state)
            _move_files_into(Path(scratch), folder)
    _barrier()
    return folder


def _move_files_into(source: Path, destination: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_dir() or path.name == _MODEL_CARD:
            continue
        target = destination / path.relative_to(source)
        # The temporary file write_with_atomic made is replaced by ours, which is then fsynced and moved in.
        write_with_atomic(target, lambda tmp, path=path: os.replace(path, tmp))


def publish_folder_together(build: Callable[[Path], Any], destination: str | os.PathLike) -> Path:
    """``files.publish_folder`` for a folder every rank writes into: ``build(folder)`` runs on each rank.

    Rank 0 makes the temporary folder and tells the others its path; once every rank's ``build``
    is done, rank 0 moves the folder into place and all ranks return. It must be on storage that
    every rank sees.
    """
    destination = Path(destination)
    if not (dist.is_available() and dist.is_initialized()):
        return publish_folder(build, destination)

    def build_everywhere(folder: Path | None) -> None:
        shared = [str(folder) if folder is not None else None]
        dist.broadcast_object_list(shared, src=0)
        build(Path(shared[0]))
        dist.barrier()

    if dist.get_rank() == 0:
        publish_folder(build_everywhere, destination)
    else:
        build_everywhere(None)
    dist.barrier()
    return destination


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The frozen int8 base is rebuilt from the model files, so only trainable tensors are kept.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _trainable_only(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    # ignore_frozen_params drops frozen parameters but keeps buffers (the base's scales, for one).
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: value for name, value in state.items() if name in trainable}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_key() -> str:
    return f"rank{_rank()}"


def write_training_state(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the trainable parameters, optimizer and each rank's RNG into ``folder`` (no atomic publishing).

    Every rank calls it with the same ``folder``; ``save_training_state`` is the atomic version.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    # Each rank's RNG under its own key: rank r continues with its own dropout stream.
    state = {
        "model": _trainable_only(model, model_state),
        "optimizer": optimizer_state,
        _RNG_KEY: {_rng_key(): _rng_state()},
    }
    dcp.save(state, checkpoint_id=os.fspath(folder))


def save_training_state(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Save what resuming a (sharded) run needs with ``torch.distributed.checkpoint``, replacing ``folder`` whole."""
    return publish_folder_together(lambda tmp: write_training_state(tmp, model, optimizer), folder)


def load_training_state(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a ``save_training_state`` folder into ``model`` (sharded as it was saved, or otherwise) and ``optimizer``.

    The model must already have its base weights and the same adapters; the optimizer must be
    over the same trainable parameters. Each rank gets back the RNG state it saved; a rank that
    did not exist when it was saved keeps its own.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise TrainingStateError(f"{folder} holds no training state (no .metadata); pass the folder that was saved")
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    state: dict[str, Any] = {"model": _trainable_only(model, model_state), "optimizer": optimizer_state}
    saved_keys = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata.keys()
    rng_key = f"{_RNG_KEY}.{_rng_key()}.cpu"
    if rng_key in saved_keys:
        state[_RNG_KEY] = {_rng_key(): _rng_state()}
    missing = sorted(f"model.{name}" for name in state["model"] if f"model.{name}" not in saved_keys)
    if missing:
        raise TrainingStateError(
            f"{folder} has no saved value for {len(missing)} trainable tensor(s) of this model, such as "
            f"{missing[0]!r}; load it into a model with the adapters (names and sizes) it was saved from"
        )
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_state_options(strict=False),
    )
    rng = state.get(_RNG_KEY, {}).get(_rng_key())
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


__all__ = [
    "TrainingStateError",
    "gather_adapter_state",
    "load_training_state",
    "publish_folder_together",
    "save_sharded_adapter",
    "save_training_state",
    "write_training_state",
]
