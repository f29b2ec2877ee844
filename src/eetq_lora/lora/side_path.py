"""The LoRA side path ``(B (A x)) * scaling`` as one autograd node that keeps its input in its own dtype.

PEFT's path casts a bfloat16 input to the float32 adapters and autograd keeps that cast alive
for ``A``'s gradient: one float32 copy of the activation per projection, even for q, k and v,
which share one input. This node saves the input tensor itself (shared by every projection
that reads it, at half the bytes) and the rank-r product ``A x``, and redoes the cast in the
backward pass. Its forward performs PEFT's operations in PEFT's order, so results are identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _peft_ops(x, weight_a, weight_b, scaling, out_dtype):
    # PEFT's operations in PEFT's order: cast to the adapter dtype, A, B, cast back, scale.
    hidden = F.linear(x.to(weight_a.dtype), weight_a)
    return hidden, F.linear(hidden, weight_b).to(out_dtype) * scaling


class _LoraSidePath(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scaling, out_dtype):
        hidden, out = _peft_ops(x, weight_a, weight_b, scaling, out_dtype)
        ctx.save_for_backward(x, weight_a, weight_b, hidden)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_a, weight_b, hidden = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        # The same steps autograd takes through PEFT's ops: scale in the output dtype, then cast.
        grad = (grad_out * ctx.scaling).to(weight_b.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = grad.reshape(-1, grad.shape[-1]).t() @ hidden.reshape(-1, hidden.shape[-1])
        if need_x or need_a:
            grad_hidden = grad @ weight_b
            if need_a:
                x_cast = x.to(weight_a.dtype).reshape(-1, x.shape[-1])
                grad_a = grad_hidden.reshape(-1, grad_hidden.shape[-1]).t() @ x_cast
            if need_x:
                grad_x = (grad_hidden @ weight_a).to(x.dtype)
        return grad_x, grad_a, grad_b, None, None


def lora_side_path(
    x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(x.to(A's dtype) @ A.T @ B.T).to(out_dtype) * scaling``, saving ``x`` uncast for the backward pass."""
    if torch.is_grad_enabled() and (x.requires_grad or weight_a.requires_grad or weight_b.requires_grad):
        return _LoraSidePath.apply(x, weight_a, weight_b, scaling, out_dtype)
    return _peft_ops(x, weight_a, weight_b, scaling, out_dtype)[1]
