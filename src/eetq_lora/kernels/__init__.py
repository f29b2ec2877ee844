"""The one dispatch point for EETQ int8 weight-only matmuls (forward and input gradient).

Compute dtype rule: activations are computed in their own dtype, except float16 on CPU, which
is computed in float32 (CPU float16 GEMMs are orders of magnitude slower) and cast back.
"""

from __future__ import annotations

import torch

from . import reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype the int8 matmul runs in for activations like ``x``."""
    if x.dtype == torch.float16 and x.device.type == "cpu":
        return torch.float32
    return x.dtype


def matmul_forward(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [M, out] = x2d [M, in] @ dequantized Wt, returned in x2d's dtype."""
    return reference.forward(x2d, qweight, scales, compute_dtype_for(x2d)).to(x2d.dtype)


def matmul_grad_input(grad2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """dx [M, in] = grad2d [M, out] @ dequantized W, returned in grad2d's dtype."""
    return reference.grad_input(grad2d, qweight, scales, compute_dtype_for(grad2d)).to(grad2d.dtype)


class _Int8LinearFunction(torch.autograd.Function):
    # Saves only the module's own int8 weight and scales: no dequantized copy outlives a call.
    @staticmethod
    def forward(ctx, x2d, qweight, scales):
        ctx.save_for_backward(qweight, scales)
        return matmul_forward(x2d, qweight, scales)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scales = ctx.saved_tensors
        grad_x = matmul_grad_input(grad_out, qweight, scales) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """EETQ linear on activations of any leading shape; differentiable in ``x`` (and ``bias`` if it trains)."""
    if not torch.is_floating_point(x) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"EetqLinear expects float16, bfloat16 or float32 input, got {x.dtype}")
    in_features, out_features = qweight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"EetqLinear expects input whose last dimension is in_features={in_features}, got shape {tuple(x.shape)}"
        )
    x2d = x.reshape(-1, in_features)
    if x2d.requires_grad and torch.is_grad_enabled():
        out = _Int8LinearFunction.apply(x2d, qweight, scales)
    else:
        out = matmul_forward(x2d, qweight, scales)
    out = out.reshape(*x.shape[:-1], out_features)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out
