"""FSDP2 (fully_shard) on an EETQ model with LoRA, 2 gloo ranks: exact gradients, 1/N of the int8 base per rank."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch.distributed.fsdp import FSDPModule

import eetq_lora
from eetq_lora import EetqLinear
from eetq_lora.parallel import ShardingError, local_int8_bytes, shard_model
from tests.helpers import PROJECTIONS, tiny_llama
from tests.parallel.helpers import churn_allocator, lora_model, loss_of, rank_batch
from tests.parallel.ranks import run_ranks

# 1-3 tokens take the decode plan path, 4-8 the streaming kernels, 40 the tiled GEMM path.
TOKENS_PER_RANK = (1, 2, 3, 4, 8, 40)
WORLD = 2


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            grad = parameter.grad
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            grads[name] = grad.detach().float().clone()
    return grads


def sharded_grads(rank, world, reshard_after_forward):
    torch.manual_seed(0)
    model = lora_model()
    total = local_int8_bytes(model)
    shard_model(model, reshard_after_forward=reshard_after_forward)
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    results = {"int8_total": total, "int8_local": local_int8_bytes(model), "units": units}
    for tokens in TOKENS_PER_RANK:
        ids = rank_batch(rank, tokens)
        loss = loss_of(model, ids)
        churn_allocator()
        loss.backward()
        results[tokens] = {"loss": loss.detach().clone(), "grads": lora_grads(model)}
        model.zero_grad(set_to_none=True)
    return results


def one_process_grads(tokens):
    torch.manual_seed(0)
    model = lora_model()
    losses = []
    for rank in range(WORLD):
        ids = rank_batch(rank, tokens)
        loss = loss_of(model, ids)
        (loss / WORLD).backward()  # FSDP2 averages gradients over ranks
        losses.append(loss.detach())
    return losses, lora_grads(model)


@pytest.fixture(scope="module")
def one_process():
    return {tokens: one_process_grads(tokens) for tokens in TOKENS_PER_RANK}


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_lora_gradients_equal_one_process(one_process, reshard_after_forward):
    ranks = run_ranks(sharded_grads, WORLD, reshard_after_forward)
    for tokens in TOKENS_PER_RANK:
        losses, expected = one_process[tokens]
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(result[tokens]["loss"], losses[rank], rtol=0, atol=1e-6)
            got = result[tokens]["grads"]
            assert got.keys() == expected.keys() and len(got) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
            for name, grad in expected.items():
                assert grad.abs().max() > 0, name
                torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=f"{tokens} tokens: {name}")
    # Each rank holds half of the int8 base, sharded in one unit per decoder layer, the embeddings,
    # the head and the root.
    prefix = "base_model.model."
    expected_units = {"", f"{prefix}model.embed_tokens", f"{prefix}lm_head"}
    expected_units |= {f"{prefix}model.layers.{i}" for i in range(2)}
    for result in ranks:
        assert result["int8_local"] * WORLD == result["int8_total"]
        assert set(result["units"]) == expected_units


def checkpointed(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def mixed_precision_checkpointed(rank, world, reshard_after_forward):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.manual_seed(0)
    model = checkpointed(lora_model())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_model(model, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, first_grads = [], None
    for step in range(6):
        ids = rank_batch(rank, 3)
        loss = loss_of(model, ids)
        churn_allocator()
        loss.backward()
        if step == 0:
            first_grads = lora_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"losses": losses, "first_grads": first_grads, "int8_local": local_int8_bytes(model)}


def one_process_bf16_first_step():
    # FSDP2's param_dtype=bfloat16 runs the forward and backward with bfloat16 copies of the float
    # parameters and reduces their gradients in float32: one process in bfloat16, each rank's
    # batch on its own, gradients averaged in float32.
    torch.manual_seed(0)
    model = checkpointed(lora_model())
    for parameter in model.parameters():  # parameters only, as the policy casts: buffers stay float32
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.bfloat16)
    losses, grads = [], []
    for rank in range(WORLD):
        ids = rank_batch(rank, 3)
        loss = loss_of(model, ids)
        loss.backward()
        losses.append(float(loss))
        grads.append(lora_grads(model))
        model.zero_grad(set_to_none=True)
    return losses, {name: sum(g[name] for g in grads) / WORLD for name in grads[0]}


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_bf16_mixed_precision_with_gradient_checkpointing(reshard_after_forward):
    ranks = run_ranks(mixed_precision_checkpointed, WORLD, reshard_after_forward)
    total = sum(m.weight.numel() for m in lora_model().modules() if isinstance(m, EetqLinear))
    losses, grads = one_process_bf16_first_step()
    for rank, result in enumerate(ranks):
        assert result["int8_local"] * WORLD == total
        assert result["losses"][0] == losses[rank]
        for name, grad in grads.items():
            torch.testing.assert_close(result["first_grads"][name], grad, rtol=0, atol=1e-6, msg=name)
        # Five more AdamW steps on the same batch: training goes on and the loss falls.
        assert all(torch.isfinite(torch.tensor(result["losses"])))
        assert result["losses"][-1] < result["losses"][0]


def test_meta_device_layers_are_refused_before_sharding():
    with torch.device("meta"):
        layer = EetqLinear(64, 64)
    model = torch.nn.Sequential(layer)
    with pytest.raises(ShardingError, match=r"meta device.*load_sharded") as info:
        shard_model(model)
    assert "\n" not in str(info.value)


def test_sharding_without_a_process_group_is_refused():
    with pytest.raises(ShardingError, match="process group"):
        shard_model(lora_model())


def refusals(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    messages = {}
    for case, wrap in {
        "fsdp1": lambda m: FullyShardedDataParallel(m, device_id=torch.device("cpu")),
        "ddp then fsdp2": lambda m: shard_model(DistributedDataParallel(m)),
        "fsdp2 twice": lambda m: shard_model(shard_model(m)),
    }.items():
        try:
            wrap(lora_model())
        except ShardingError as error:
            messages[case] = str(error)
    # FSDP1 on a model without EETQ layers is left alone.
    FullyShardedDataParallel(torch.nn.Linear(4, 4), device_id=torch.device("cpu"))
    return messages


def test_fsdp1_ddp_mixes_and_double_sharding_get_one_clear_error():
    (messages,) = run_ranks(refusals, 1)
    assert "FSDP2" in messages["fsdp1"] and "shard_model" in messages["fsdp1"]
    assert "DistributedDataParallel" in messages["ddp then fsdp2"] and "model.module" in messages["ddp then fsdp2"]
    assert "already sharded" in messages["fsdp2 twice"]
    assert all("\n" not in message for message in messages.values())


def sharded_state_dicts(rank, world, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    torch.manual_seed(0)
    model = shard_model(lora_model())
    ids = rank_batch(0, 5)
    with torch.no_grad():
        before = model(input_ids=ids[:1]).logits
    sharded = get_model_state_dict(model)
    assert not any("quant_linear_module" in key for key in sharded)
    dcp.save(sharded, checkpoint_id=folder)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # A second sharded model with other weights takes the first one's state back from disk.
    torch.manual_seed(1)
    other = shard_model(
        eetq_lora.get_peft_model(
            eetq_lora.quantize_model(tiny_llama(seed=7, hidden_size=128, intermediate_size=256)),
            LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False),
        )
    )
    state = get_model_state_dict(other)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(other, state)
    with torch.no_grad():
        after = other(input_ids=ids[:1]).logits
    int8_full = {key: value for key, value in full.items() if value.dtype == torch.int8} if rank == 0 else {}
    return {"before": before, "after": after, "int8_full": int8_full}


def test_sharded_state_dicts_save_and_load_with_dcp(tmp_path):
    ranks = run_ranks(sharded_state_dicts, WORLD, str(tmp_path / "dcp"))
    for result in ranks:
        assert torch.equal(result["before"], result["after"])
    # Gathered from shards, the int8 weights are the plain matrices (not the EETQ sm75 bytes).
    model = lora_model()
    plain = {
        name + ".weight": module.weight for name, module in model.named_modules() if isinstance(module, EetqLinear)
    }
    gathered = ranks[0]["int8_full"]
    assert gathered.keys() == plain.keys()
    for key, weight in plain.items():
        assert torch.equal(gathered[key], weight), key


def full_state_dict_while_sharded(rank, world):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.manual_seed(0)
    model = shard_model(lora_model())
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def test_a_full_state_dict_taken_while_sharded_loads_unsharded_in_the_plain_layout():
    # DCP's full state dict keeps the int8 weights plain: a model loading it unsharded must be told.
    state = run_ranks(full_state_dict_while_sharded, WORLD)[0]
    torch.manual_seed(0)
    reference = lora_model()
    ids = rank_batch(0, 8)[:1]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        for name, module in reference.named_modules():
            if isinstance(module, EetqLinear):
                assert torch.equal(state[f"{name}.weight"], module.weight), name
        plain = lora_model()
        eetq_lora.set_checkpoint_layout(plain, "plain")
        plain.load_state_dict(state)
        assert torch.equal(plain(input_ids=ids).logits, expected)
        packed = lora_model()  # the default layout reads the plain bytes as packed ones
        packed.load_state_dict(state)
        assert not torch.equal(packed(input_ids=ids).logits, expected)
