"""The EETQ int8 format: quantization math, checkpoint layouts, the EetqLinear layer, whole-model conversion."""

from .layout import LAYOUTS, pack_weight, unpack_weight
from .linear import EetqLinear, set_checkpoint_layout
from .model import quantize_model
from .quantize import dequantize_weight, quantize_weight

__all__ = [
    "LAYOUTS",
    "EetqLinear",
    "dequantize_weight",
    "pack_weight",
    "quantize_model",
    "quantize_weight",
    "set_checkpoint_layout",
    "unpack_weight",
]
