"""EETQ int8 layers: EetqLinear (the frozen int8 linear that owns its matmul) and in-place model conversion."""

from .linear import EetqLinear, set_checkpoint_layout
from .model import quantize_linears

__all__ = ["EetqLinear", "quantize_linears", "set_checkpoint_layout"]
