"""Build and load ordinary peft.PeftModels whose EETQ layers are EetqLoraLinear."""

from __future__ import annotations

import copy
import os
from typing import Any

import peft
import torch
from peft import LoraConfig, PeftModel

from ..integrations.eetq_layers import eetq_layer_classes
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


def get_peft_model(
    model: torch.nn.Module, lora_config: LoraConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """``peft.get_peft_model`` (which takes EETQ models itself once ``eetq_lora`` is imported).

    The result is a plain ``peft.PeftModel`` whose EETQ layers are EetqLoraLinear;
    ``target_modules="all-linear"`` reaches every EetqLinear and nn.Linear except the output head.
    ``lora_config`` is copied, not changed.
    """
    return peft.get_peft_model(model, register_eetq(copy.deepcopy(lora_config)), adapter_name=adapter_name, **kwargs)


def add_adapter(peft_model: PeftModel, adapter_name: str, lora_config: LoraConfig) -> None:
    """Add another (trainable) LoRA adapter to a PeftModel built on an EETQ model (``PeftModel.add_adapter``)."""
    peft_model.add_adapter(adapter_name, register_eetq(copy.deepcopy(lora_config)))


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
