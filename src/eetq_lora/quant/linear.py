"""EetqLinear: a frozen EETQ int8 weight-only linear layer that runs on any device."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import int8_linear
from .quantize import dequantize_weight, quantize_weight


class EetqLinear(nn.Module):
    """A frozen int8 linear layer in EETQ's format.

    ``weight`` is int8 [in_features, out_features] (EETQ's orientation), ``weight_scales`` is
    float16 [out_features] (one scale per output channel) and ``bias`` is optional, in
    ``dtype``. The forward accepts float16, bfloat16 or float32 activations with any leading
    dimensions, returns the input's dtype and is differentiable in its input only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"EetqLinear needs positive sizes, got in_features={in_features}, out_features={out_features}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"EetqLinear dtype is the bias dtype and must be a float dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.zeros(in_features, out_features, dtype=torch.int8, device=device), requires_grad=False
        )
        # Scales stay float16 whatever the model is cast to (see _apply): they are the checkpoint format.
        self.register_buffer("weight_scales", torch.zeros(out_features, dtype=torch.float16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.float16) -> "EetqLinear":
        """Quantize an ``nn.Linear`` (fp16, bf16 or fp32 weight) into a new EetqLinear on the same device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"EetqLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError("EetqLinear.from_linear got a weight on the meta device; load the weights first")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=weight.device, dtype=dtype)
        q, scales = quantize_weight(weight)
        layer.weight.data = q
        layer.weight_scales = scales
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().to(dtype).clone()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out_features, in_features]; float16 (the default) is EETQ's exact dequantization."""
        return dequantize_weight(self.weight, self.weight_scales, dtype or self.weight_scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and torch.is_floating_point(x):
            # Like nn.Linear under autocast: run in the autocast dtype, then let the kernel pick
            # its own compute dtype without autocast rewriting its matmuls.
            x = x.to(torch.get_autocast_dtype(device_type))
            with torch.autocast(device_type, enabled=False):
                return int8_linear(x, self.weight, self.weight_scales, self.bias)
        return int8_linear(x, self.weight, self.weight_scales, self.bias)

    def _apply(self, fn, recurse=True):
        scales = self.weight_scales
        super()._apply(fn, recurse)
        if self.weight_scales.dtype != torch.float16:
            # A model-wide dtype cast (model.to(torch.bfloat16)) must not round the scales: move them only.
            self.weight_scales = scales.to(device=self.weight_scales.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
