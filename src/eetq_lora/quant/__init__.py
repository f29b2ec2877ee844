"""The EETQ int8 format: quantization math, the EetqLinear layer, whole-model conversion."""

from .linear import EetqLinear
from .model import quantize_model
from .quantize import dequantize_weight, quantize_weight

__all__ = ["EetqLinear", "dequantize_weight", "quantize_model", "quantize_weight"]
