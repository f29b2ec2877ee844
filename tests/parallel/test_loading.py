"""load_sharded on 2 gloo ranks: an EETQ checkpoint read straight into FSDP2 shards equals a one-process load."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import eetq_lora
from eetq_lora.errors import ConfigError, ModelError
from eetq_lora.parallel import ShardingError, local_int8_bytes
from eetq_lora.parallel.loading import load_sharded
from tests.helpers import PROJECTIONS, VOCAB, tiny_llama, token_batch
from tests.parallel.ranks import run_ranks

WORLD = 2
SIZES = dict(hidden_size=128, intermediate_size=256)
LORA_SEED = 3
LEARNING_RATE = 0.5


def save_checkpoint(folder, *, skip=("lm_head",), max_shard_size=None, **overrides):
    model = eetq_lora.quantize_model(tiny_llama(seed=0, **SIZES, **overrides), modules_to_not_convert=skip)
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eetq_checkpoints")
    folders = {
        "single": save_checkpoint(root / "single"),
        # Several files with an index; down_proj stays float, as its modules_to_not_convert says.
        "split": save_checkpoint(root / "split", skip=("lm_head", "mlp.down_proj"), max_shard_size="100KB"),
        "tied": save_checkpoint(root / "tied", tie_word_embeddings=True),
    }
    assert len(json.loads((root / "split" / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list((root / "split").glob("*.safetensors"))) > 1
    return folders


# ---- what each rank runs -------------------------------------------------------------------------


class ReadTracer:
    """Stands in for safetensors' safe_open and records every tensor read: its bytes, and the most bytes of
    read tensors alive at once (a loader that kept what it read, or views of it, or read everything first,
    shows here). A read stays alive while its storage does, so a view kept of it counts too."""

    def __init__(self, real):
        self.real = real
        self.reads: list[tuple[str, int]] = []
        self.alive: list[tuple[weakref.ref, int]] = []
        self.max_alive_bytes = 0

    def __call__(self, path, framework, **kwargs):
        return _TracedHandle(self.real(path, framework=framework, **kwargs), self)

    def record(self, key, tensor):
        size = tensor.numel() * tensor.element_size()
        self.reads.append((key, size))
        self.alive = [(ref, n) for ref, n in self.alive if ref() is not None]
        self.alive.append((weakref.ref(tensor.untyped_storage()), size))
        self.max_alive_bytes = max(self.max_alive_bytes, sum(n for _, n in self.alive))
        return tensor


class _TracedHandle:
    def __init__(self, handle, tracer):
        self.handle, self.tracer = handle, tracer

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def metadata(self):
        return self.handle.metadata()

    def get_tensor(self, key):
        return self.tracer.record(key, self.handle.get_tensor(key))

    def get_slice(self, key):
        return _TracedSlice(self.handle.get_slice(key), key, self.tracer)


class _TracedSlice:
    def __init__(self, view, key, tracer):
        self.view, self.key, self.tracer = view, key, tracer

    def get_shape(self):
        return self.view.get_shape()

    def get_dtype(self):
        return self.view.get_dtype()

    def __getitem__(self, index):
        return self.tracer.record(self.key, self.view[index])


def traced_load(folder, **kwargs):
    from eetq_lora.parallel import loading

    tracer = ReadTracer(loading.safe_open)
    unpack = loading.unpack_weight
    loading.safe_open = tracer
    # An unpacked int8 weight is a full copy of what was read: it counts as read as well.
    loading.unpack_weight = lambda stored, *args, **kwargs: tracer.record("unpacked", unpack(stored, *args, **kwargs))
    try:
        model = load_sharded(folder, **kwargs)
    finally:
        loading.safe_open, loading.unpack_weight = tracer.real, unpack
    return model, tracer


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def rank_batch(rank):
    generator = torch.Generator().manual_seed(500 + rank)
    return torch.randint(0, VOCAB, (2, 8), generator=generator)


def loss_of(model, batch):
    logits = model(input_ids=batch[:1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), batch[1])


def lora_tensors(model, grads=False):
    out = {}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            tensor = parameter.grad if grads else parameter
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            out[name] = tensor.detach().clone()
    return out


def one_process_peft(folder, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(LORA_SEED)
    return eetq_lora.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config)


def check_loads(rank, world, folders):
    # References are computed here too, in this same process, so the float math runs on the same
    # thread count and equal logits mean equal bits.
    from transformers import AutoModelForCausalLM

    batch = token_batch()
    results = {}
    for variant, folder in folders.items():
        reference = AutoModelForCausalLM.from_pretrained(folder)
        model, tracer = traced_load(folder)
        results[variant] = {
            "logits": logits_of(model, batch),
            "reference": logits_of(reference, batch),
            "int8_local": local_int8_bytes(model),
            "int8_total": local_int8_bytes(reference),
            "reads": tracer.reads,
            "max_alive_bytes": tracer.max_alive_bytes,
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "inv_freq": model.model.rotary_emb.inv_freq.clone(),
            "reference_inv_freq": reference.model.rotary_emb.inv_freq.clone(),
            "training": model.training,
        }
    # Another float dtype: the float tensors are cast on the way in, exactly as from_pretrained casts them.
    bf16 = load_sharded(folders["single"], dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(folders["single"], dtype=torch.bfloat16)
    results["bf16"] = {"logits": logits_of(bf16, batch), "reference": logits_of(reference, batch)}
    results["lora_init"] = check_lora_init(folders["single"])
    results["lora_step"] = check_lora_step(rank, world, folders["single"])
    return results


def check_lora_init(folder):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS)  # Kaiming-uniform A, zero B
    own_seed = 1234 + torch.distributed.get_rank()  # each rank's own random state must not matter
    torch.manual_seed(own_seed)
    model = load_sharded(folder, lora_config=config, seed=LORA_SEED)
    after_load = torch.random.get_rng_state()
    torch.manual_seed(own_seed)
    rng_untouched = torch.equal(after_load, torch.random.get_rng_state())
    return {
        "got": lora_tensors(model),
        "want": lora_tensors(one_process_peft(folder, config)),
        "rng_untouched": rng_untouched,
        "int8_local": local_int8_bytes(model),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    }


def check_lora_step(rank, world, folder):
    # init_lora_weights=False keeps nn.Linear's random init for both A and B, so both get gradients.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    model = load_sharded(folder, lora_config=config, seed=LORA_SEED)
    model.train()
    loss = loss_of(model, rank_batch(rank))
    loss.backward()
    grads = lora_tensors(model, grads=True)
    sgd_step(model)
    after = loss_of(model, rank_batch(rank)).detach()

    reference = one_process_peft(folder, config)
    reference.train()
    losses = []
    for other in range(world):
        other_loss = loss_of(reference, rank_batch(other))
        (other_loss / world).backward()  # FSDP2 averages gradients over ranks
        losses.append(other_loss.detach())
    reference_grads = lora_tensors(reference, grads=True)
    sgd_step(reference)
    return {
        "loss": loss.detach(),
        "after": after,
        "grads": grads,
        "reference_loss": losses[rank],
        "reference_after": loss_of(reference, rank_batch(rank)).detach(),
        "reference_grads": reference_grads,
    }


def sgd_step(model):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def ranks(checkpoints):
    return run_ranks(check_loads, WORLD, checkpoints)


# ---- the checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["single", "split", "tied"])
def test_logits_equal_one_process_load_bit_for_bit(ranks, variant):
    for result in ranks:
        got = result[variant]
        assert torch.equal(got["logits"], got["reference"])
        assert torch.equal(got["inv_freq"], got["reference_inv_freq"])  # recomputed after to_empty
        assert not got["training"]  # eval mode, as from_pretrained leaves it


def test_other_float_dtype_matches_from_pretrained(ranks):
    for result in ranks:
        assert result["bf16"]["logits"].dtype == torch.bfloat16
        assert torch.equal(result["bf16"]["logits"], result["bf16"]["reference"])


@pytest.mark.parametrize("variant", ["single", "split", "tied"])
def test_each_rank_holds_half_the_int8_base(ranks, variant):
    for result in ranks:
        assert result[variant]["int8_total"] > 0
        assert result[variant]["int8_local"] * WORLD == result[variant]["int8_total"]


def test_tied_embeddings_stay_tied(ranks, checkpoints):
    with safe_open(f"{checkpoints['tied']}/model.safetensors", framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # the head has no tensor of its own to load
    assert all(result["tied"]["tied"] for result in ranks)
    assert not any(result["single"]["tied"] for result in ranks)


def stored_tensors(folder):
    """{key: (bytes, dtype)} of every tensor in a checkpoint folder."""
    stored = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                stored[key] = (tensor.numel() * tensor.element_size(), tensor.dtype)
    return stored


@pytest.mark.parametrize("variant", ["single", "split"])
def test_no_rank_holds_more_than_two_checkpoint_tensors_at_once(ranks, checkpoints, variant):
    stored = stored_tensors(checkpoints[variant])
    int8_total = sum(size for size, dtype in stored.values() if dtype == torch.int8)
    largest = max(size for size, _ in stored.values())
    assert int8_total == ranks[0][variant]["int8_total"]
    for result in ranks:
        reads = [(key, size) for key, size in result[variant]["reads"] if key != "unpacked"]
        unpacked = [size for key, size in result[variant]["reads"] if key == "unpacked"]
        assert sorted(key for key, _ in reads) == sorted(stored)  # each tensor read once
        assert sum(unpacked) == int8_total  # every int8 weight unpacked once, whole (sm75 needs that)
        # What was read (and unpacked) is dropped as the load goes on: the int8 base is never held at once.
        assert result[variant]["max_alive_bytes"] <= 2 * largest
        assert result[variant]["max_alive_bytes"] < int8_total
        # Sharded float tensors come in as this rank's rows only: the embeddings, the head, and in
        # "split" the down_proj layers left in float.
        reads = dict(reads)
        for key in reads:
            if key.endswith(("embed_tokens.weight", "lm_head.weight", "down_proj.weight")):
                size, dtype = stored[key]
                assert reads[key] * WORLD == size if dtype.is_floating_point else reads[key] == size, key


def test_lora_starts_as_get_peft_model_starts_it_in_one_process(ranks):
    for result in ranks:
        init = result["lora_init"]
        assert init["got"].keys() == init["want"].keys() and len(init["got"]) == 2 * 7 * 2
        for name, want in init["want"].items():
            assert torch.equal(init["got"][name], want), name
        assert any(want.abs().max() > 0 for want in init["want"].values())
        assert init["rng_untouched"]
        assert init["trainable"] == sorted(init["want"])  # the base (norms, embeddings) stays frozen
        assert init["int8_local"] * WORLD == result["single"]["int8_total"]


def test_lora_trains_on_the_sharded_model(ranks):
    for result in ranks:
        step = result["lora_step"]
        assert torch.equal(step["loss"], step["reference_loss"])
        assert step["grads"].keys() == step["reference_grads"].keys() and len(step["grads"]) == 28
        for name, want in step["reference_grads"].items():
            assert want.abs().max() > 0, name
            torch.testing.assert_close(step["grads"][name], want, rtol=0, atol=1e-6, msg=name)
        # One SGD step on the averaged gradients: the same step as in one process.
        assert torch.isfinite(step["after"])
        torch.testing.assert_close(step["after"], step["reference_after"], rtol=0, atol=1e-5)
    mean_before = sum(result["lora_step"]["loss"] for result in ranks) / WORLD
    mean_after = sum(result["lora_step"]["after"] for result in ranks) / WORLD
    assert mean_after < mean_before


# ---- bad input, caught before any sharding (no process group needed) -------------------------------


def test_refuses_folders_that_are_not_eetq_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="is not a folder"):
        load_sharded(tmp_path / "absent")
    with pytest.raises(ModelError, match="no config.json"):
        load_sharded(tmp_path)
    float_folder = tmp_path / "float"
    tiny_llama(seed=0, **SIZES).save_pretrained(float_folder)
    with pytest.raises(ModelError, match="not an EETQ checkpoint"):
        load_sharded(float_folder)
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    shutil.copy(f"{save_checkpoint(tmp_path / 'q')}/config.json", only_bin / "config.json")
    (only_bin / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="safetensors only.*pytorch_model.bin"):
        load_sharded(only_bin)


def rewrite(checkpoint, tmp_path, name, change):
    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)
    return folder


def test_refuses_missing_and_mismatched_tensors(checkpoints, tmp_path):
    prefix = "model.layers.0.self_attn."
    broken = {
        "missing": (lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scales"), "lacks 1 tensor.*down_proj"),
        "shape": (lambda t: t.update({prefix + "q_proj.weight_scales": torch.ones(64, dtype=torch.float16)}), "shape"),
        "float": (lambda t: t.update({prefix + "q_proj.weight": torch.ones(128, 128)}), "int8 weight belongs"),
        "transposed": (
            lambda t: t.update({prefix + "k_proj.weight": t[prefix + "k_proj.weight"].T.contiguous()}),
            "looks transposed",
        ),
    }
    for name, (change, message) in broken.items():
        with pytest.raises(ModelError, match=message):
            load_sharded(rewrite(checkpoints["single"], tmp_path, name, change))


def test_refuses_lora_options_it_cannot_load_and_a_missing_process_group(checkpoints):
    config = LoraConfig(r=4, target_modules=PROJECTIONS, modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        load_sharded(checkpoints["single"], lora_config=config)
    with pytest.raises(ShardingError, match="process group"):
        load_sharded(checkpoints["single"])
