"""Integrations with other libraries: transformers' quantizer registry (see ``hf_quantizer``)."""

from .hf_quantizer import (
    EetqLoraHfQuantizer,
    disable_transformers,
    enable_transformers,
    is_transformers_enabled,
    mark_eetq_quantized,
    read_checkpoint_layout,
)

__all__ = [
    "EetqLoraHfQuantizer",
    "disable_transformers",
    "enable_transformers",
    "is_transformers_enabled",
    "mark_eetq_quantized",
    "read_checkpoint_layout",
]
