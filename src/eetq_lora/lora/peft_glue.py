"""Build and load ordinary peft.PeftModels whose EETQ layers are EetqLoraLinear."""

from __future__ import annotations

import copy
import os
from typing import Any

import peft
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from .._compat import eetq_layer_classes
from ..quant.model import is_skipped
from .layer import EetqLoraLinear


def register_eetq(config: LoraConfig) -> LoraConfig:
    """Add EETQ layers to ``config``'s custom-module mapping (in place) and return it.

    PEFT does not save that mapping with the adapter, so every config that creates or loads
    adapters on an EETQ model needs it: `get_peft_model`, `load_adapter` and `add_adapter` call it.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"eetq_lora supports LoRA adapters only, got {type(config).__name__}")
    config._register_custom_module({cls: EetqLoraLinear for cls in eetq_layer_classes()})
    return config


def _linear_module_names(model: torch.nn.Module) -> set[str]:
    # PEFT's own "all-linear" only sees nn.Linear/Conv1D; we add EETQ layers and keep its rule of
    # leaving out the output head. A layer PEFT already wrapped counts under its own name, and
    # the adapters inside it (lora_A, lora_B, base_layer) are not targets.
    linear_types = (torch.nn.Linear, *eetq_layer_classes())
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: set[str] = set()
    inside_tuner: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_tuner):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_tuner.append(name + ".")
            module = module.get_base_layer()
        if not isinstance(module, linear_types) or module is output_head or is_skipped(name, ("lm_head",)):
            continue
        names.add(name.rsplit(".", 1)[-1])
    return names


def _resolve_all_linear(model: torch.nn.Module, config: LoraConfig) -> LoraConfig:
    target = config.target_modules
    if isinstance(target, str) and target.lower() == "all-linear":
        names = _linear_module_names(model)
        if not names:
            raise ValueError("target_modules='all-linear' found no linear or EETQ layer in the model")
        config.target_modules = names
    return config


def get_peft_model(
    model: torch.nn.Module, lora_config: LoraConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Attach LoRA adapters to a (quantized) model; EETQ layers get EetqLoraLinear.

    The result is a plain ``peft.PeftModel``. ``target_modules="all-linear"`` reaches every
    EetqLinear and nn.Linear except the output head. ``lora_config`` is copied, not changed.
    """
    config = register_eetq(_resolve_all_linear(model, copy.deepcopy(lora_config)))
    return peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


def add_adapter(peft_model: PeftModel, adapter_name: str, lora_config: LoraConfig) -> None:
    """Add another (trainable) LoRA adapter to a PeftModel built on an EETQ model."""
    config = register_eetq(_resolve_all_linear(peft_model.get_base_model(), copy.deepcopy(lora_config)))
    peft_model.add_adapter(adapter_name, config)


def load_adapter(
    model: torch.nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``model`` is a quantized base model (a new PeftModel is returned) or a PeftModel (the
    adapter is added to it and it is returned). Adapters trained on the float model load too.
    """
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"no adapter_config.json in {os.fspath(path)!r}: is this a saved PEFT adapter folder?")
    config = register_eetq(LoraConfig.from_pretrained(path))
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        model.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable)
        if is_trainable:
            model.set_requires_grad(adapter_name)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config)
