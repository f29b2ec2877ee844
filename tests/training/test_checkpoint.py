"""A run's checkpoint: what it holds, that training resumes from it exactly, and that it is replaced whole."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from eetq_lora import get_peft_model, load_adapter, quantize_model
from eetq_lora.errors import UserError
from eetq_lora.training.checkpoint import (
    restore_optimizer_and_rng,
    restore_sharded_state,
    save_checkpoint,
)
from eetq_lora.training.run_folder import checkpoint_path, find_resumable, read_state
from tests.helpers import tiny_llama, token_batch

RECORD = {"format": 1, "settings": {"steps": 4}, "model": {"name": "tiny"}, "data": {"source": "test"}}


def new_run():
    """A tiny quantized Llama with LoRA (dropout on, so training draws random numbers) and its optimizer."""
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(quantize_model(tiny_llama()), lora)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(model, optimizer, steps: int) -> None:
    for step in range(steps):
        ids = token_batch(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_first_checkpoint_publishes_the_run_folder_with_its_record(tmp_path):
    model, optimizer = new_run()
    train(model, optimizer, 1)
    run = tmp_path / ".run.partial"
    state = {"step": 1, "train_losses": [2.5]}
    save_checkpoint(run, model, optimizer, state, RECORD)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "run_config.json"]
    assert json.loads((run / "run_config.json").read_text()) == RECORD
    names = {p.name for p in checkpoint_path(run).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng.pt", "state.json"} <= names
    assert read_state(run) == state
    assert find_resumable(tmp_path / "run") == run

    # Later checkpoints replace checkpoint/ only.
    save_checkpoint(run, model, optimizer, {"step": 2, "train_losses": [2.5, 2.4]})
    assert read_state(run)["step"] == 2
    assert json.loads((run / "run_config.json").read_text()) == RECORD
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial"]  # no temporary folders left


def test_training_resumed_from_a_checkpoint_matches_training_straight_through(tmp_path):
    model, optimizer = new_run()
    train(model, optimizer, 2)
    save_checkpoint(tmp_path, model, optimizer, {"step": 2}, RECORD)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # training updates the tensors in place
    train(model, optimizer, 2)  # steps 3 and 4, with the random numbers that followed the checkpoint
    straight = trainable_state(model)

    torch.manual_seed(1234)  # whatever this process drew since, the checkpoint's RNG state comes back
    resumed_model = load_adapter(quantize_model(tiny_llama()), checkpoint_path(tmp_path), is_trainable=True)
    resumed_model.train()
    trainable = [p for p in resumed_model.parameters() if p.requires_grad]
    resumed_optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    restore_optimizer_and_rng(tmp_path, resumed_optimizer, torch.device("cpu"))
    restored = resumed_optimizer.state_dict()
    assert restored["param_groups"] == saved_optimizer["param_groups"]
    for index, tensors in saved_optimizer["state"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(restored["state"][index][key], value, rtol=0, atol=0)
    train(resumed_model, resumed_optimizer, 2)
    resumed = trainable_state(resumed_model)
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_the_rng_state_is_part_of_the_checkpoint(tmp_path):
    model, optimizer = new_run()
    save_checkpoint(tmp_path, model, optimizer, {"step": 0}, RECORD)
    after_save = torch.rand(5)
    torch.manual_seed(99)
    restore_optimizer_and_rng(tmp_path, optimizer, torch.device("cpu"))
    torch.testing.assert_close(torch.rand(5), after_save, rtol=0, atol=0)


def test_a_failed_save_leaves_the_previous_checkpoint_as_it_was(tmp_path, monkeypatch):
    model, optimizer = new_run()
    run = tmp_path / "run"
    save_checkpoint(run, model, optimizer, {"step": 1}, RECORD)
    before = snapshot(run)
    train(model, optimizer, 1)
    real_save = torch.save

    def disk_full_at_rng(obj, path, *args, **kwargs):
        if Path(path).name == "rng.pt":
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_rng)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(run, model, optimizer, {"step": 2})
    assert snapshot(run) == before and read_state(run)["step"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "run_config.json"]  # no half-written copy

    # A run's first checkpoint that fails leaves no run folder at all.
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "fresh", model, optimizer, {"step": 2}, RECORD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_checkpoint_without_shards_is_not_resumed_sharded(tmp_path):
    model, optimizer = new_run()
    save_checkpoint(tmp_path, model, optimizer, {"step": 1}, RECORD)
    with pytest.raises(UserError, match=r"saved by a run without --fsdp .*resume it without --fsdp"):
        restore_sharded_state(tmp_path, model, optimizer)
