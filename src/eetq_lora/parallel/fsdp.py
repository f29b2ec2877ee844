"""Sharding an EETQ model with PyTorch FSDP2 (``fully_shard``): each rank holds 1/N of the int8 base.

FSDP2 treats ``EetqLinear.weight`` like any frozen parameter: it is split on dim 0 (rows of the
[in, out] int8 matrix) across the mesh, gathered before a block's forward and freed after it
(``reshard_after_forward=True``), then gathered again for the backward. ``weight_scales`` is a
buffer and stays whole on every rank (2 bytes per output channel). int8 parameters are never
cast by a ``MixedPrecisionPolicy``; LoRA weights and biases are.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..quant.linear import EetqLinear


class ShardingError(UserError, ValueError):
    """A model cannot be sharded as asked; the message says what to do instead."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: modules of a class named in ``_no_split_modules``."""
    inner = unwrap_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [module for module in inner.modules() if type(module).__name__ in names]
    # Keep the outermost matches only: fully_shard must not nest a block inside another block.
    outer = []
    for block in blocks:
        if not any(block is not other and _contains(other, block) for other in blocks):
            outer.append(block)
    return outer


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(module is child for module in parent.modules())


def check_shardable(model: nn.Module, *, allow_meta: bool = False) -> None:
    """Raise a ShardingError where ``model`` cannot go to ``fully_shard`` as it is."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        where = f" ({name})" if name else ""
        if isinstance(module, DistributedDataParallel):
            raise ShardingError(
                f"the model{where} is wrapped in DistributedDataParallel; FSDP2 replaces DDP, so shard the "
                "unwrapped model (model.module) and do not wrap it in DDP"
            )
        if isinstance(module, FSDP1):
            raise ShardingError(
                f"the model{where} is wrapped in FSDP1 (FullyShardedDataParallel), which cannot flatten an int8 "
                "base; use FSDP2 instead: eetq_lora.parallel.shard_model(model) or torch's fully_shard"
            )
        if isinstance(module, FSDPModule):
            raise ShardingError(f"the model{where} is already sharded with fully_shard; shard it once")
        if isinstance(module, EetqLinear) and not allow_meta:
            if module.weight.device.type == "meta" or module.weight_scales.device.type == "meta":
                raise ShardingError(
                    f"EETQ layer {name!r} is on the meta device, so sharding it would shard no weights; load the "
                    "checkpoint with eetq_lora.parallel.load_sharded(...) or load weights before sharding"
                )
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ShardingError(
            "sharding needs a process group: start the job with torchrun and call "
            "torch.distributed.init_process_group() (gloo on CPU, nccl on GPUs) first"
        )


def shard_model(
    model: nn.Module,
    *,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    offload_policy: Any = None,
) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` the way transformers decoders are usually sharded, and return the model.

    Each decoder layer, the input embeddings and (when not tied to them) the output head become
    their own FSDP unit; the root takes the rest (final norm, a tied head). Works on a plain
    transformers model or a ``PeftModel`` with EETQ layers and LoRA adapters; the keyword
    arguments are ``fully_shard``'s own.
    """
    check_shardable(model)
    return _fully_shard_units(
        model,
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp_policy,
        offload_policy=offload_policy,
    )


def _fully_shard_units(model: nn.Module, **options: Any) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = {
        "mesh": options.get("mesh"),
        "reshard_after_forward": options.get("reshard_after_forward", True),
        "mp_policy": options.get("mp_policy") or MixedPrecisionPolicy(),
        "offload_policy": options.get("offload_policy") or OffloadPolicy(),
    }
    inner = unwrap_model(model)
    for block in decoder_layers(inner):
        fully_shard(block, **kwargs)
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    tied = embeddings is not None and head is not None and getattr(head, "weight", None) is embeddings.weight
    if not tied:
        # A tied head shares its weight with the embeddings: both stay in the root unit together.
        for unit in (embeddings, head):
            if unit is not None and any(True for _ in unit.parameters()):
                fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local_int8_bytes(model: nn.Module) -> int:
    """Bytes of EETQ int8 weight this rank holds (its shard under FSDP2 or ZeRO-3, all of it otherwise)."""
    total = 0
    for module in model.modules():
        if isinstance(module, EetqLinear):
            total += _local_numel(module.weight)
    return total


def _local_numel(tensor: torch.Tensor) -> int:
    to_local = getattr(tensor, "to_local", None)
    if callable(to_local):  # DTensor
        return to_local().numel()
    partition = getattr(tensor, "ds_tensor", None)  # a ZeRO-3 partitioned parameter
    if partition is not None:
        # Plus any whole copy ZeRO-3 holds (small "persistent" or prefetched parameters, or inside forward).
        return partition.numel() + tensor.numel()
    return tensor.numel()


# FSDP1's words when a unit holds int8 parameters: "Cannot flatten integer dtype tensors", or
# "Must flatten tensors with uniform dtype" when float ones share the unit.
_FSDP1_FLATTEN_WORD = "flatten"


def explain_fsdp1_refusal() -> None:
    """Make FSDP1's failure on an int8 base say what to do (idempotent; called on import).

    FSDP1 flattens every parameter of a unit into one float buffer and refuses int8 ones with a
    bare ValueError about flattening. Where the unit holds EETQ layers, the error is
    re-raised as a ShardingError pointing to FSDP2; every other FSDP1 use is left as it was.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    original = FullyShardedDataParallel.__init__
    if getattr(original, "_eetq_explains_int8", False):
        return

    @functools.wraps(original)
    def __init__(self, module, *args, **kwargs):
        try:
            original(self, module, *args, **kwargs)
        except ValueError as error:
            layers = [name for name, m in module.named_modules() if isinstance(m, EetqLinear)]
            if _FSDP1_FLATTEN_WORD not in str(error) or not layers:
                raise
            raise ShardingError(
                f"FSDP1 (FullyShardedDataParallel) cannot shard the int8 EETQ layers ({layers[0]!r} and "
                f"{len(layers) - 1} more): it flattens parameters into one float buffer. Use FSDP2 instead: "
                "eetq_lora.parallel.shard_model(model), or torch.distributed.fsdp.fully_shard; with accelerate, "
                "set fsdp_version: 2"
            ) from error

    __init__._eetq_explains_int8 = True  # type: ignore[attr-defined]
    FullyShardedDataParallel.__init__ = __init__
