"""The int8 matmul as torch.library operators, so torch.compile traces EetqLinear without graph breaks.

The compiled kernels are ctypes calls that TorchDynamo cannot trace; as operators they are opaque
nodes with a shape function, and each runs the dispatcher when the compiled graph executes. The
compute dtype (``policy``) is read when an operator runs, so a compiled backward pass reads it
again rather than reusing its forward's.
"""

from __future__ import annotations

import torch

from .dispatch import int8_linear, matmul_grad_input


@torch.library.custom_op("eetq_lora::int8_matmul", mutates_args=())
def int8_matmul(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x2d [M, in] @ dequantized Wt`` in ``x2d``'s dtype; differentiable in ``x2d``."""
    with torch.no_grad():
        return int8_linear(x2d, qweight, scales, None)


@int8_matmul.register_fake
def _int8_matmul_shape(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x2d.new_empty((x2d.shape[0], qweight.shape[1]))


@torch.library.custom_op("eetq_lora::int8_matmul_grad_input", mutates_args=())
def int8_matmul_grad_input(grad2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``grad2d [M, out] @ dequantized W`` in ``grad2d``'s dtype."""
    return matmul_grad_input(grad2d, qweight, scales)


@int8_matmul_grad_input.register_fake
def _grad_input_shape(grad2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return grad2d.new_empty((grad2d.shape[0], qweight.shape[0]))


def _save_weight(ctx, inputs, output) -> None:
    # Only the int8 weight and its scales, as in eager mode.
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, grad: torch.Tensor):
    qweight, scales = ctx.saved_tensors
    grad_x = int8_matmul_grad_input(grad.contiguous(), qweight, scales) if ctx.needs_input_grad[0] else None
    return grad_x, None, None


int8_matmul.register_autograd(_backward, setup_context=_save_weight)


def traced_int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``int8_linear`` in operations TorchDynamo can trace: reshape, the operator, bias."""
    in_features, out_features = qweight.shape
    out = int8_matmul(x.reshape(-1, in_features), qweight, scales).reshape(*x.shape[:-1], out_features)
    return out if bias is None else out + bias.to(out.dtype)
