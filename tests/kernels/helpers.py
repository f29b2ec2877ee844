"""Operands and an independent float64 reference for the int8 kernel tests."""

from __future__ import annotations

import torch

from eetq_lora import dequantize_weight

# (in_features, out_features): tiny, odd (vector and block tails everywhere), and LLM-like.
SHAPES = [(64, 48), (100, 37), (256, 320)]


def int8_weight(in_features: int, out_features: int, layout: str = "in_out", seed: int = 0):
    """An int8 weight [in, out] as EetqLinear holds it, and float16 scales [out].

    ``layout="in_out"`` stores it row-major [in, out] (EetqLinear's default); ``"out_in"`` stores
    the row-major [out, in] transpose and returns its [in, out] view.
    """
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = (torch.rand(out_features, generator=generator) / 64 + 1e-4).half()
    qweight = q.t() if layout == "out_in" else q.t().contiguous()
    return qweight, scales


def float64_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ Wt in float64 from the exact dequantized weight."""
    weight = dequantize_weight(qweight, scales, torch.float32).double()
    return x.double() @ weight.t()


def float64_grad_input(grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """grad @ W in float64 from the exact dequantized weight."""
    weight = dequantize_weight(qweight, scales, torch.float32).double()
    return grad.double() @ weight


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale
