"""quantize_model: the one verb that turns a float model into an EETQ int8 one, transformers models included."""

from __future__ import annotations

from collections.abc import Iterable

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from ..quant.model import quantize_linears
from .hf_quantizer import mark_eetq_quantized


def quantize_model(model: nn.Module, modules_to_not_convert: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except ``modules_to_not_convert``) by an EetqLinear, in place.

    Every weight is checked first (finite, in range, loaded), so a bad one raises before any layer
    changes; then the float weights are released layer by layer. The model is returned. Logs how many layers
    were converted and how many bytes that saved. A transformers model is also marked as
    EETQ-quantized, so its ``save_pretrained`` writes an EETQ checkpoint that ``from_pretrained``
    reads back.
    """
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "quantize_model got a model that already has PEFT adapters: their lora_A/lora_B layers would be "
            "quantized and frozen too. Quantize the base model first, then add the adapters: "
            "get_peft_model(quantize_model(model), config)"
        )
    skips = tuple(modules_to_not_convert or ())
    converted = quantize_linears(model, skips)
    if converted and isinstance(model, PreTrainedModel):
        # save_pretrained then writes an EETQ checkpoint, and PEFT/Trainer see an EETQ model.
        mark_eetq_quantized(model, skips)
    elif converted:
        # The marker transformers' quantizers set; PEFT's prepare_model_for_kbit_training reads it.
        model.quantization_method = "eetq"
    return model
