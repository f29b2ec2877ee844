"""Saving a sharded (FSDP2) LoRA run on 2 gloo ranks: PEFT adapter files, and training state that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

import eetq_lora
from eetq_lora.data import Encoded
from eetq_lora.parallel import shard_model
from eetq_lora.parallel.checkpoint import (
    TrainingStateError,
    load_training_state,
    save_sharded_adapter,
    save_training_state,
)
from eetq_lora.training.distributed import context_from_env
from eetq_lora.training.evaluate import evaluate
from eetq_lora.training.loss import answer_token_stats
from tests.helpers import PROJECTIONS, VOCAB, tiny_llama
from tests.parallel.ranks import run_ranks

LORA_TENSORS = 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
WORLD = 2
STEPS = 8
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def base_model(**overrides):
    return eetq_lora.quantize_model(tiny_llama(seed=0, hidden_size=128, intermediate_size=256, **overrides))


def lora_model(**overrides):
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so every saved tensor is non-trivial.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=PROJECTIONS, init_lora_weights=False)
    return eetq_lora.get_peft_model(base_model(**overrides), config)


def batch(seed: int, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """A collated batch whose first 4 positions are prompt (no label), as finetune's data gives."""
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def held_out_items() -> list[Encoded]:
    """5 examples of different lengths: with 2 ranks and batches of 2, rank 0 runs 2 batches and rank 1 one."""
    generator = torch.Generator().manual_seed(3)
    items = []
    for length in (9, 6, 14, 11, 7):
        ids = tuple(torch.randint(1, VOCAB, (length,), generator=generator).tolist())
        items.append(Encoded(input_ids=ids, labels=(-100,) * 3 + ids[3:]))
    return items


def train_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    return batch(100 * step + rank)


def train(model, optimizer, steps: range, rank: int) -> list[float]:
    """The finetune step: mean answer-token loss with LoRA dropout, clipped gradients, AdamW."""
    model.train()
    losses = []
    for step in steps:
        stats = answer_token_stats(model, train_batch(step, rank))
        (stats.nll / stats.tokens).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(stats.nll.detach()) / stats.tokens)
    return losses


def sharded_lora_model():
    model = lora_model()
    shard_model(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def tied_head_step(model) -> dict:
    """Loss and LoRA gradients of one batch (the same on every rank) with the head tied to the embeddings."""
    model.eval()  # no dropout: every rank and one process compute the same thing
    stats = answer_token_stats(model, batch(9, rows=3))
    (stats.nll / stats.tokens).backward()  # the mean answer-token loss, as finetune trains on
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
    return {"nll": stats.nll.detach(), "correct": stats.correct, "grads": grads}


@torch.no_grad()
def probe(model) -> dict:
    model.eval()
    stats = answer_token_stats(model, batch(7, rows=3))
    logits = model(input_ids=batch(8)["input_ids"]).logits
    return {"nll": stats.nll, "tokens": stats.tokens, "correct": stats.correct, "logits": logits}


def first_run(rank: int, world: int, folder: str) -> dict:
    from torch.distributed.tensor import DTensor

    folder = Path(folder)
    model, optimizer = sharded_lora_model()
    gathered = []
    full_tensor = DTensor.full_tensor

    def recording_full_tensor(self, *args, **kwargs):
        gathered.append(str(self.dtype))
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = recording_full_tensor
    try:
        save_sharded_adapter(model, folder / "initial")
    finally:
        DTensor.full_tensor = full_tensor
    initial_probe = probe(model)
    held_out = evaluate(model, held_out_items(), 2, 0, torch.device("cpu"), context_from_env(), lockstep=True).to_dict()
    tied = lora_model(tie_word_embeddings=True)
    shard_model(tied)  # the head stays in the root unit with the embeddings
    tied_step = tied_head_step(tied)

    torch.manual_seed(100 + rank)  # each rank its own dropout stream
    straight = train(model, optimizer, range(STEPS), rank)

    model, optimizer = sharded_lora_model()
    torch.manual_seed(100 + rank)
    first_half = train(model, optimizer, range(STEPS // 2), rank)
    save_training_state(folder / "state", model, optimizer)
    save_sharded_adapter(model, folder / "trained")
    return {
        "gathered": gathered,
        "initial_probe": initial_probe,
        "tied_step": tied_step,
        "held_out": held_out,
        "straight": straight,
        "first_half": first_half,
        "trained_probe": probe(model),
    }


def resumed_run(rank: int, world: int, folder: str) -> dict:
    torch.manual_seed(12345)  # a fresh process: a different RNG state, which the checkpoint must replace
    model, optimizer = sharded_lora_model()
    load_training_state(Path(folder) / "state", model, optimizer)
    return {"second_half": train(model, optimizer, range(STEPS // 2, STEPS), rank)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    first = run_ranks(first_run, WORLD, str(folder))
    second = run_ranks(resumed_run, WORLD, str(folder))
    return folder, first, second


def adapter_config(folder: Path) -> dict:
    config = json.loads((folder / ADAPTER_FILES[0]).read_text())
    # PEFT writes target_modules from a set, in an order that differs between processes.
    config["target_modules"] = sorted(config["target_modules"])
    return config


def test_sharded_adapter_files_equal_an_unsharded_save(runs, tmp_path):
    folder, first, _ = runs
    reference = lora_model()
    reference.save_pretrained(tmp_path)
    got, expected = load_file(folder / "initial" / ADAPTER_FILES[1]), load_file(tmp_path / ADAPTER_FILES[1])
    assert got.keys() == expected.keys() and len(got) == LORA_TENSORS
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert adapter_config(folder / "initial") == adapter_config(tmp_path)
    assert sorted(p.name for p in (folder / "initial").iterdir()) == sorted(ADAPTER_FILES)
    # Only the LoRA tensors were gathered (float32), never an int8 weight of the base.
    for result in first:
        assert result["gathered"] == ["torch.float32"] * LORA_TENSORS


def test_saved_adapters_load_on_one_process_with_the_same_outputs(runs):
    folder, first, _ = runs
    for name, key in (("initial", "initial_probe"), ("trained", "trained_probe")):
        loaded = eetq_lora.load_adapter(base_model(), folder / name)
        expected = probe(loaded)
        for result in first:
            got = result[key]
            torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=1e-5, msg=name)
            torch.testing.assert_close(got["nll"], expected["nll"], rtol=1e-6, atol=0, msg=name)
            assert (got["tokens"], got["correct"]) == (expected["tokens"], expected["correct"])


def test_answer_token_loss_of_a_sharded_model_equals_one_process(runs):
    # One process takes the chunked vocabulary projection; the sharded model calls its own head.
    _, first, _ = runs
    model = lora_model().eval()
    with torch.no_grad():
        stats = answer_token_stats(model, batch(7, rows=3))
        logits = model(input_ids=batch(7, rows=3)["input_ids"]).logits[:, :-1].float()
    labels = batch(7, rows=3)["labels"][:, 1:]
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(stats.nll, plain, rtol=1e-6, atol=0)
    for result in first:
        torch.testing.assert_close(result["initial_probe"]["nll"], stats.nll, rtol=1e-6, atol=0)
        assert result["initial_probe"]["tokens"] == stats.tokens == 3 * 8
        assert result["initial_probe"]["correct"] == stats.correct


def test_held_out_scores_of_a_sharded_model_equal_one_process_with_uneven_shares(runs):
    # Rank 1 has fewer batches than rank 0 and runs an extra forward so that rank 0's gathers complete.
    _, first, _ = runs
    expected = evaluate(lora_model(), held_out_items(), 2, 0, torch.device("cpu")).to_dict()
    for result in first:
        got = result["held_out"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert (got["accuracy"], got["tokens"], got["examples"]) == (
            expected["accuracy"],
            expected["tokens"],
            expected["examples"],
        )
        assert got["tokens"] == sum(len(item.input_ids) - 3 for item in held_out_items())


def test_loss_and_gradients_of_a_sharded_tied_head_model_equal_one_process(runs):
    _, first, _ = runs
    expected = tied_head_step(lora_model(tie_word_embeddings=True))
    assert len(expected["grads"]) == LORA_TENSORS
    for result in first:
        got = result["tied_step"]
        torch.testing.assert_close(got["nll"], expected["nll"], rtol=1e-6, atol=0)
        assert got["correct"] == expected["correct"]
        assert got["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-6, msg=name)


def test_resumed_training_continues_exactly_like_an_uninterrupted_run(runs):
    folder, first, second = runs
    for rank in range(WORLD):
        straight = first[rank]["straight"]
        assert first[rank]["first_half"] == straight[: STEPS // 2]
        assert second[rank]["second_half"] == straight[STEPS // 2 :]
        assert straight[-1] != straight[STEPS // 2 - 1]
    # Only trainable tensors, optimizer moments and RNG are saved: no int8 weight of the base.
    saved = torch.distributed.checkpoint.FileSystemReader(str(folder / "state")).read_metadata()
    keys = saved.state_dict_metadata.keys()
    assert sum(key.startswith("model.") for key in keys) == LORA_TENSORS
    assert all("lora_" in key for key in keys if key.startswith("model."))
    assert {"rng.rank0.cpu", "rng.rank1.cpu"} <= set(keys)
    assert not any(
        meta.properties.dtype == torch.int8
        for meta in saved.state_dict_metadata.values()
        if hasattr(meta, "properties")
    )


def test_a_folder_without_training_state_is_a_clear_error(tmp_path):
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(TrainingStateError, match="no training state"):
        load_training_state(tmp_path, model, optimizer)
