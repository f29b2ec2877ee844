"""Swap a model's nn.Linear layers for EetqLinear in place (``quantize_linears``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.quantizers.quantizers_utils import should_convert_module

from ..format.quantize import check_quantizable
from .linear import EetqLinear, bias_dtype_for

logger = logging.getLogger("eetq_lora")


def is_skipped(module_name: str, modules_to_not_convert: Iterable[str]) -> bool:
    """Whether ``module_name`` matches an entry of ``modules_to_not_convert``, by transformers' rules.

    The same rules as transformers' loader, so a saved model reloads with the same layers
    quantized: an entry matches from the start of the name up to a module boundary (its whole
    subtree), as a regex with that boundary, or as a suffix (``"lm_head"`` matches
    ``"model.lm_head"``).
    """
    return not should_convert_module(module_name, list(modules_to_not_convert))


def _is_convertible(module: nn.Module) -> bool:
    # nn.MultiheadAttention reads its out_proj weight directly, so that Linear subclass must stay float.
    return isinstance(module, nn.Linear) and not isinstance(module, NonDynamicallyQuantizableLinear)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def quantize_linears(model: nn.Module, modules_to_not_convert: Iterable[str] = ("lm_head",)) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (except ``modules_to_not_convert``) by an EetqLinear, in place.

    Every weight is checked first (finite, in range, loaded), so a bad one raises before any layer
    changes; then the float weights are released layer by layer. Returns the converted layers' names
    and logs how many bytes that saved. ``eetq_lora.quantize_model`` also marks the model as quantized.
    """
    skips = tuple(modules_to_not_convert or ())
    names = [name for name, module in model.named_modules() if _is_convertible(module) and not is_skipped(name, skips)]
    # Every weight is checked before any layer is replaced: a bad weight leaves the model as it was.
    for name in names:
        linear = model.get_submodule(name)
        if linear.weight.device.type == "meta":
            raise ValueError(f"layer {name!r} is on the meta device; load the model's weights before quantizing")
        check_quantizable(linear.weight, name)
    bytes_before = bytes_after = 0
    for name in names:
        linear = model.get_submodule(name)
        bytes_before += tensor_bytes(linear)
        quantized = EetqLinear.from_linear(linear, dtype=bias_dtype_for(linear), name=name)
        bytes_after += tensor_bytes(quantized)
        model.set_submodule(name, quantized)
    logger.info(
        "eetq_lora: converted %d linear layers to EETQ int8, %.1f MiB -> %.1f MiB (saved %.1f MiB)",
        len(names),
        bytes_before / 2**20,
        bytes_after / 2**20,
        (bytes_before - bytes_after) / 2**20,
    )
    return names
