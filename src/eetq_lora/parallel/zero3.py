"""Saving an EETQ model with LoRA trained under DeepSpeed ZeRO-3: full state dicts and PEFT adapter folders.

ZeRO-3 partitions every parameter, the int8 ``EetqLinear.weight`` included (its ``weight_scales``
is a buffer and stays whole on each rank): outside a module's forward and backward its parameters
are 0-size and each rank holds a flat 1-D piece of each (``param.ds_tensor``). A plain
``state_dict()`` or ``save_pretrained()`` then sees those 0-size tensors.

The helpers here gather what they save (a full state dict one layer at a time, an adapter's
tensors only) and are collective: every rank must call them, in the same order.

DeepSpeed's own ``engine.save_16bit_model`` (``_zero3_consolidated_16bit_state_dict``) copies
parameters without asking the modules, so it writes EETQ int8 weights as they sit in memory:
uncast, but in the plain layout, not the layout the layers' ``load_state_dict`` reads (load such
a file after ``set_checkpoint_layout(model, "plain")``). ``gathered_state_dict`` writes the layers'
own checkpoint layout, as an unsharded model does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import publish_folder
from ..errors import UserError


class Zero3Error(UserError, ValueError):
    """A ZeRO-3 save was asked for something it cannot do; the message says what to do instead."""


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter managed by ZeRO-3 (it has a ``ds_id`` and a partition)."""
    return hasattr(tensor, "ds_id") and getattr(tensor, "ds_tensor", None) is not None


def _module_of(model: nn.Module) -> nn.Module:
    """The user's model inside a ``DeepSpeedEngine`` (or ``model`` itself)."""
    # Without deepspeed imported there can be no engine: importing it here would only cost time.
    deepspeed = sys.modules.get("deepspeed")
    engine_type = getattr(deepspeed, "DeepSpeedEngine", None)
    return model.module if engine_type is not None and isinstance(model, engine_type) else model


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def _gathered_during_state_dict(model: nn.Module, rank0_only: bool) -> Iterator[None]:
    """While open, ``model.state_dict()`` gathers each module's own parameters just around its save.

    Only one module's parameters (and those of the modules enclosing it) are whole at a time, so
    the peak is one layer, not the model. With ``rank0_only`` the other ranks drop each module's
    entries once it is saved.
    """
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    open_contexts: dict[int, Any] = {}
    gathered: set[int] = set()
    handles = []

    def before(module: nn.Module, prefix: str, keep_vars: bool) -> None:
        # A parameter shared with an enclosing module is already whole: gathering it twice is refused.
        own = [p for p in module.parameters(recurse=False) if is_partitioned(p) and id(p) not in gathered]
        context = GatheredParameters(own, modifier_rank=None)
        context.__enter__()
        open_contexts[id(module)] = (context, own)
        gathered.update(id(p) for p in own)

    def after(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        context, own = open_contexts.pop(id(module))
        if rank0_only and _rank() != 0:
            for key in [key for key in state_dict if key.startswith(prefix)]:
                del state_dict[key]
        else:
            # Entries of gathered parameters are views of storage that ZeRO-3 may reuse once it
            # partitions them again (on accelerators, its gather buffers): copy them to the CPU.
            for name, parameter in module.named_parameters(recurse=False):
                value = state_dict.get(prefix + name)
                if value is None or not is_partitioned(parameter):
                    continue
                if value.device.type != "cpu":
                    state_dict[prefix + name] = value.cpu()
                elif _shares_storage(value, parameter):
                    state_dict[prefix + name] = value.clone()
        gathered.difference_update(id(p) for p in own)
        context.__exit__(None, None, None)

    for module in model.modules():
        handles.append(module.register_state_dict_pre_hook(before))
        handles.append(module.register_state_dict_post_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for context, _ in reversed(list(open_contexts.values())):
            context.__exit__(None, None, None)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def gathered_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The full ``state_dict()`` of a model partitioned by ZeRO-3, as one process would write it.

    EETQ layers write their int8 weight in their ``checkpoint_layout`` (sm75 by default) with
    float16 scales, exactly as an unsharded model does; partitioned parameters come back as whole
    copies on the CPU. Works on the model, a ``PeftModel`` or the ``DeepSpeedEngine`` around them
    (same keys as the model's own ``state_dict``), and on an unpartitioned model too.
    Collective: call it on every rank. With ``rank0_only`` the other ranks get an empty dict and
    never hold more than one layer's worth of it.
    """
    module = _module_of(model)
    if not any(is_partitioned(p) for p in module.parameters()):
        return module.state_dict() if not rank0_only or _rank() == 0 else {}
    with _gathered_during_state_dict(module, rank0_only):
        return module.state_dict()


def _adapter_tensors(peft_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    # Which tensors PEFT saves for this adapter, under the model's own state-dict names: PEFT picks
    # them from a keep_vars state dict, whose values are the parameters themselves.
    from peft import get_peft_model_state_dict

    every = peft_model.state_dict(keep_vars=True)
    chosen = get_peft_model_state_dict(peft_model, state_dict=every, adapter_name=adapter_name)
    chosen_ids = {id(tensor) for tensor in chosen.values()}
    return {key: tensor for key, tensor in every.items() if id(tensor) in chosen_ids}


def gathered_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Whole copies of the tensors PEFT saves for ``adapter_name`` (keys as in the model's state dict).

    Gathers those parameters only, never the int8 base. Collective: call it on every rank.
    """
    peft_model = _peft_model_of(model)
    if adapter_name not in peft_model.peft_config:
        raise Zero3Error(f"the model has no adapter {adapter_name!r}; pass one of {sorted(peft_model.peft_config)}")
    tensors = _adapter_tensors(peft_model, adapter_name)
    partitioned = [t for t in tensors.values() if is_partitioned(t)]
    if not partitioned:
        return {key: tensor.detach().clone() for key, tensor in tensors.items()}
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(partitioned, modifier_rank=None):
        return {key: tensor.detach().clone() for key, tensor in tensors.items()}


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write ``adapter_name`` as an ordinary PEFT adapter folder from a model partitioned by ZeRO-3.

    The adapter's parameters are gathered on every rank, rank 0 writes the folder with PEFT's
    ``save_pretrained`` (adapter_config.json and adapter_model.safetensors) into a temporary
    folder that replaces ``save_directory`` in one step, and all ranks return once it is there.
    Collective: call it on every rank. Returns ``save_directory``.
    """
    peft_model = _peft_model_of(model)
    tensors = gathered_adapter_state_dict(peft_model, adapter_name)
    destination = Path(save_directory)
    if _rank() == 0:
        options = {"state_dict": tensors, "selected_adapters": [adapter_name], "is_main_process": True}
        # save_pretrained puts a non-default adapter in a subfolder named after it, as PEFT does.
        publish_folder(lambda folder: peft_model.save_pretrained(str(folder), **options), destination)
    _barrier()
    return destination


def _peft_model_of(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    module = _module_of(model)
    if not isinstance(module, PeftModel):
        raise Zero3Error(
            f"expected a PeftModel (or a DeepSpeedEngine around one), got {type(module).__name__}; "
            "wrap the model with eetq_lora.get_peft_model(model, config) before deepspeed.initialize"
        )
    return module
