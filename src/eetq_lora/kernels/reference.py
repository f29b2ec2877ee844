"""Pure-torch int8 weight-only matmuls: always available, and the reference every fast path is tested against."""

from __future__ import annotations

import torch

from ..format.quantize import dequantize_weight


def _dequantized_t(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Wt [in, out] in `dtype`; EETQ-exact when dtype is float16.
    return dequantize_weight(qweight, scales, dtype).t()


def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [M, in] @ dequantized Wt [in, out] in ``dtype``; the weight copy dies with the call."""
    return x.to(dtype) @ _dequantized_t(qweight, scales, dtype)


def grad_input(grad_out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad_out [M, out] @ dequantized W [out, in] in ``dtype``."""
    return grad_out.to(dtype) @ _dequantized_t(qweight, scales, dtype).t()
