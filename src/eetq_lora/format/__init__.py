"""The EETQ int8 format, the package's leaf layer: quantization math and checkpoint weight layouts.

Depends on torch only; kernels, layers and loaders build on it.
"""

from .layout import LAYOUTS, pack_weight, unpack_weight
from .quantize import FLOAT_DTYPES, dequantize_weight, quantize_weight

__all__ = ["FLOAT_DTYPES", "LAYOUTS", "dequantize_weight", "pack_weight", "quantize_weight", "unpack_weight"]
