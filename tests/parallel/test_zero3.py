"""DeepSpeed ZeRO-3 on an EETQ model with LoRA, 2 gloo ranks on the CPU: exact training, half the int8 each, saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# The CPU accelerator must be chosen before deepspeed is first imported (the spawned ranks inherit it).
os.environ["DS_ACCELERATOR"] = "cpu"
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed; ZeRO-3 support is tested with it")

from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import eetq_lora  # noqa: E402
from eetq_lora import EetqLinear  # noqa: E402
from eetq_lora.format.layout import unpack_weight  # noqa: E402
from eetq_lora.parallel import local_int8_bytes  # noqa: E402
from eetq_lora.parallel.zero3 import (  # noqa: E402
    Zero3Error,
    gathered_adapter_state_dict,
    gathered_state_dict,
    is_partitioned,
    save_adapter,
)
from tests.helpers import tiny_llama  # noqa: E402
from tests.parallel.helpers import churn_allocator, lora_model, loss_of, rank_batch  # noqa: E402
from tests.parallel.ranks import run_ranks  # noqa: E402

WORLD = 2
# Tokens per rank at each training step: 1-3 take the cached decode-plan kernel, 4-8 the streaming kernels.
STEP_TOKENS = (1, 2, 3, 4, 8)
LEARNING_RATE = 0.1
CLIP_NORM = 1.0
ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": CLIP_NORM,  # DeepSpeed's default, spelled out: the reference clips the same way
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {
        "stage": 3,
        # By default DeepSpeed keeps a parameter whole after its first use when it is small (below
        # 1e5 elements), when it is used again soon (within 1e9 elements), or when it lies within
        # the prefetch window (5e7 elements); the whole tiny model falls under each. With 0 every
        # int8 weight is whole only around its own layer's forward and backward, as in a large model.
        "stage3_param_persistence_threshold": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 0,
    },
}


def make_optimizer(model) -> torch.optim.Optimizer:
    # SGD, not Adam: with one token per rank the query and key adapters get rounding-noise
    # gradients (softmax over one position is constant), which Adam would scale up to full steps.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, momentum=0.9)


def eetq_layers(model) -> list[EetqLinear]:
    return [module for module in model.modules() if isinstance(module, EetqLinear)]


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def zero3_run(rank, world, folder):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    model = lora_model()
    result = {"int8_total": local_int8_bytes(model)}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=ZERO3)
    layers = eetq_layers(engine.module)
    result["int8_local"] = local_int8_bytes(engine.module)
    result["partitioned"] = all(is_partitioned(layer.weight) for layer in layers)

    # The int8 weight is whole inside its layer's forward and 0-size everywhere else.
    seen_in_forward = set()
    for layer in layers:
        layer.register_forward_pre_hook(lambda layer, args: seen_in_forward.add(tuple(layer.weight.shape)))
    expected_shapes = {(layer.in_features, layer.out_features) for layer in layers}
    outside = [layer.weight.numel() for layer in layers]
    steps = []
    for tokens in STEP_TOKENS:
        loss = loss_of(engine, rank_batch(rank, tokens))
        outside += [layer.weight.numel() for layer in layers]
        churn_allocator()  # memory freed after forward is reused before backward, as in a real step
        engine.backward(loss)
        grads = {name: safe_get_full_grad(p).clone() for name, p in lora_parameters(engine.module).items()}
        engine.step()
        outside += [layer.weight.numel() for layer in layers]
        steps.append({"loss": loss.detach().clone(), "grads": grads})
    result["steps"] = steps
    result["whole_in_forward"] = seen_in_forward == expected_shapes
    result["max_numel_outside_forward"] = max(outside)
    result["int8_local_after"] = local_int8_bytes(engine.module)

    # A plain state_dict() does not fail: partitioned tensors are there, 0-size.
    plain = engine.module.state_dict()
    result["plain_numels"] = {key: plain[key].numel() for key in plain if "lora_" in key or key.endswith(".weight")}
    result["plain_scales"] = {key: value.clone() for key, value in plain.items() if key.endswith("weight_scales")}

    # What users write: everything gathered around the model's own state_dict().
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        result["user_gathered"] = {key: value.clone() for key, value in engine.module.state_dict().items()}
    result["helper"] = gathered_state_dict(engine)
    result["helper_rank0"] = gathered_state_dict(engine.module, rank0_only=True)
    result["engine_16bit"] = engine._zero3_consolidated_16bit_state_dict()
    result["adapter_tensors"] = gathered_adapter_state_dict(engine)
    save_adapter(engine, Path(folder) / "adapter")
    result["adapter_written_before_return"] = (Path(folder) / "adapter" / "adapter_model.safetensors").is_file()
    result["max_numel_after_saving"] = max(layer.weight.numel() for layer in layers)
    return result


def one_process_training():
    """The same steps in one process: each step's loss on each rank's batch, gradients averaged over ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same summation order in every matmul
    try:
        return _one_process_training()
    finally:
        torch.set_num_threads(threads)


def _one_process_training():
    torch.manual_seed(0)
    model = lora_model()
    optimizer = make_optimizer(model)
    steps = []
    for tokens in STEP_TOKENS:
        losses = []
        for rank in range(WORLD):
            loss = loss_of(model, rank_batch(rank, tokens))
            (loss / WORLD).backward()
            losses.append(loss.detach().clone())
        grads = {name: p.grad.detach().clone() for name, p in lora_parameters(model).items()}
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"losses": losses, "grads": grads})
    return model, steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero3")
    ranks = run_ranks(zero3_run, WORLD, str(folder))
    model, steps = one_process_training()
    return {"ranks": ranks, "model": model, "steps": steps, "folder": folder}


def assert_state_dicts_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if "lora_" in key:  # trained in two ways: the same to float32 rounding
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
        else:  # frozen: bit for bit
            assert torch.equal(got[key], value), key


def test_training_matches_one_process(runs):
    for rank, result in enumerate(runs["ranks"]):
        for step, (got, expected) in enumerate(zip(result["steps"], runs["steps"], strict=True)):
            where = f"rank {rank}, step {step} ({STEP_TOKENS[step]} tokens)"
            torch.testing.assert_close(got["loss"], expected["losses"][rank], rtol=0, atol=1e-6, msg=where)
            assert got["grads"].keys() == expected["grads"].keys() and len(got["grads"]) == 2 * 7 * 2
            for name, grad in expected["grads"].items():
                assert grad.abs().max() > 0, name  # A and B both train
                torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-6, msg=f"{where}: {name}")
    # The trained LoRA weights agree too (checked in every state dict below; here on their own).
    trained = {name: p.detach() for name, p in lora_parameters(runs["model"]).items()}
    for result in runs["ranks"]:
        for name, value in trained.items():
            torch.testing.assert_close(result["helper"][name], value, rtol=0, atol=1e-6, msg=name)


def test_each_rank_holds_half_the_int8_base(runs):
    total = sum(layer.weight.numel() for layer in eetq_layers(runs["model"]))
    for result in runs["ranks"]:
        assert result["partitioned"]
        assert result["int8_total"] == total
        assert result["int8_local"] * WORLD == total
        assert result["int8_local_after"] * WORLD == total
        assert result["whole_in_forward"]
        assert result["max_numel_outside_forward"] == 0
        assert result["max_numel_after_saving"] == 0


def test_plain_state_dict_works_and_holds_partitions(runs):
    model = runs["model"]
    expected_scales = {key: value for key, value in model.state_dict().items() if key.endswith("weight_scales")}
    for result in runs["ranks"]:
        numels = result["plain_numels"]
        assert numels and all(numel == 0 for numel in numels.values())
        # The float16 scales are buffers: whole on every rank, never partitioned or cast.
        assert_state_dicts_equal(result["plain_scales"], expected_scales)


def test_consolidated_state_dicts_equal_one_process(runs):
    expected = runs["model"].state_dict()  # int8 weights packed in the sm75 layout, scales float16
    some_weight = next(key for key in expected if key.endswith("q_proj.base_layer.weight"))
    assert expected[some_weight].dtype == torch.int8
    assert expected[some_weight.removesuffix("weight") + "weight_scales"].dtype == torch.float16
    for rank, result in enumerate(runs["ranks"]):
        assert_state_dicts_equal(result["user_gathered"], expected)
        assert_state_dicts_equal(result["helper"], expected)
        if rank == 0:
            assert_state_dicts_equal(result["helper_rank0"], expected)
        else:
            assert result["helper_rank0"] == {}


def test_engine_16bit_state_dict_keeps_int8_but_in_the_plain_layout(runs):
    # DeepSpeed's consolidation copies parameters without the layers' state-dict logic: int8 stays
    # int8 (no cast), but in memory's plain layout. Loading it needs checkpoint_layout "plain".
    model = runs["model"]
    expected = model.state_dict()
    got = runs["ranks"][0]["engine_16bit"]
    assert runs["ranks"][1]["engine_16bit"] is None  # rank 0 only
    assert list(got) == list(expected)
    layers = dict(model.named_modules())
    for key, value in expected.items():
        owner = layers[key.rsplit(".", 1)[0]]
        if isinstance(owner, EetqLinear) and key.endswith(".weight"):
            assert got[key].dtype == torch.int8
            assert torch.equal(got[key], owner.weight)
            assert torch.equal(got[key], unpack_weight(value, "sm75"))
            assert not torch.equal(got[key], value)  # the same matrix, not the same bytes as a checkpoint
    fresh = lora_model()
    eetq_lora.set_checkpoint_layout(fresh, "plain")
    fresh.load_state_dict(got)
    eetq_lora.set_checkpoint_layout(fresh, "sm75")
    assert_state_dicts_equal(fresh.state_dict(), expected)


def test_saved_adapter_is_an_ordinary_peft_folder_with_the_trained_weights(runs):
    model = runs["model"]
    folder = runs["folder"] / "adapter"
    assert all(result["adapter_written_before_return"] for result in runs["ranks"])
    files = sorted(path.name for path in folder.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    saved = load_file(folder / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(model)
    assert saved.keys() == expected.keys() and len(saved) == 2 * 7 * 2
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-6, msg=key)
    for result in runs["ranks"]:
        tensors = result["adapter_tensors"]
        assert tensors.keys() == lora_parameters(model).keys()
        for key, value in lora_parameters(model).items():
            torch.testing.assert_close(tensors[key], value.detach(), rtol=0, atol=1e-6, msg=key)
    # It loads onto a freshly quantized base as any PEFT adapter does and gives the trained model's logits.
    base = eetq_lora.quantize_model(tiny_llama(seed=0, hidden_size=128, intermediate_size=256))
    loaded = eetq_lora.load_adapter(base, folder).eval()
    assert isinstance(loaded, PeftModel)
    ids = rank_batch(0, 8)[:1]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_helpers_without_zero3():
    model = lora_model()
    assert_state_dicts_equal(gathered_state_dict(model), model.state_dict())
    assert gathered_adapter_state_dict(model).keys() == lora_parameters(model).keys()
    with pytest.raises(Zero3Error, match="no adapter 'other'"):
        gathered_adapter_state_dict(model, "other")
    with pytest.raises(Zero3Error, match="expected a PeftModel"):
        save_adapter(torch.nn.Linear(2, 2), "unused")
