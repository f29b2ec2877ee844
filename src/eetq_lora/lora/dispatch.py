"""dispatch_eetq: PEFT's dispatcher hook that wraps EETQ int8 layers in EetqLoraLinear."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..integrations.eetq_layers import eetq_layer_classes
from .layer import EetqLoraLinear


def dispatch_eetq(target: torch.nn.Module, adapter_name: str, **kwargs: Any) -> Optional[torch.nn.Module]:
    """An EetqLoraLinear around ``target`` if it (or the layer it wraps) is an EETQ linear layer, else None.

    Recognises this package's EetqLinear, ``eetq.EetqLinear`` and transformers' EetqLinear.
    """
    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base_layer, eetq_layer_classes()):
        return None

    if kwargs.get("parameter_name") is not None:
        raise ValueError(
            f"target_parameters reached the EETQ int8 layer {kwargs.get('target_name') or type(base_layer).__name__!r} "
            f"(parameter {kwargs['parameter_name']!r}); a frozen int8 weight cannot take a parameter adapter. Target "
            "the layer itself with target_modules=[...] and leave target_parameters out"
        )
    new_module = EetqLoraLinear(target, adapter_name, **kwargs)
    # A tuner-layer target already exposes its base layer's weight/bias through read-only
    # properties; assigning to them would fail, so only a bare layer gets them set.
    if not isinstance(target, BaseTunerLayer):
        target.weight = base_layer.weight
        if hasattr(base_layer, "bias"):
            target.bias = base_layer.bias
    return new_module
