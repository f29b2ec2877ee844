"""Integrations with transformers: its quantizer registry (``hf_quantizer``) and ``quantize_model``."""

from .hf_quantizer import (
    EetqLoraHfQuantizer,
    disable_transformers,
    enable_transformers,
    is_transformers_enabled,
    mark_eetq_quantized,
    read_checkpoint_layout,
)
from .quantize_model import quantize_model

__all__ = [
    "EetqLoraHfQuantizer",
    "disable_transformers",
    "enable_transformers",
    "is_transformers_enabled",
    "mark_eetq_quantized",
    "quantize_model",
    "read_checkpoint_layout",
]
