"""eetq-lora: LoRA fine-tuning of EETQ int8 weight-only quantized models, on any device."""

from ._compat import is_eetq_available
from .lora import EetqLoraLinear, add_adapter, dispatch_eetq, get_peft_model, load_adapter, register_eetq
from .quant import EetqLinear, dequantize_weight, quantize_model, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "EetqLinear",
    "EetqLoraLinear",
    "add_adapter",
    "dequantize_weight",
    "dispatch_eetq",
    "get_peft_model",
    "is_eetq_available",
    "load_adapter",
    "quantize_model",
    "quantize_weight",
    "register_eetq",
]
