"""quantize_model: swap a model's nn.Linear layers for EetqLinear in place."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from .linear import EetqLinear

logger = logging.getLogger("eetq_lora")


def is_skipped(module_name: str, modules_to_not_convert: Iterable[str]) -> bool:
    """Whether ``module_name`` matches an entry of ``modules_to_not_convert``.

    An entry matches the module of that exact name, any module whose dotted path ends with it
    (``"lm_head"`` matches ``"model.lm_head"``) and everything below a matched module.
    """
    for skip in modules_to_not_convert:
        if module_name == skip or module_name.endswith("." + skip):
            return True
        if module_name.startswith(skip + ".") or ("." + skip + ".") in module_name:
            return True
    return False


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def quantize_model(model: nn.Module, modules_to_not_convert: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except ``modules_to_not_convert``) by an EetqLinear, in place.

    The float weights are released layer by layer; the model is returned. Logs how many layers
    were converted and how many bytes that saved.
    """
    skips = tuple(modules_to_not_convert or ())
    names = [
        name for name, module in model.named_modules() if type(module) is nn.Linear and not is_skipped(name, skips)
    ]
    bytes_before = bytes_after = 0
    for name in names:
        linear = model.get_submodule(name)
        bytes_before += _tensor_bytes(linear)
        quantized = EetqLinear.from_linear(linear)
        bytes_after += _tensor_bytes(quantized)
        model.set_submodule(name, quantized)
    # The marker transformers' own quantizers set; PEFT's prepare_model_for_kbit_training reads it.
    model.quantization_method = "eetq"
    logger.info(
        "eetq_lora: converted %d linear layers to EETQ int8, %.1f MiB -> %.1f MiB (saved %.1f MiB)",
        len(names),
        bytes_before / 2**20,
        bytes_after / 2**20,
        (bytes_before - bytes_after) / 2**20,
    )
    return model
