"""EETQ's per-channel symmetric int8 quantization math: absmax/128 scales, round half away from zero."""

from __future__ import annotations

import warnings

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    # C's round(): ties go away from zero (torch.round goes to even). x - trunc(x) is exact
    # in float32, so this avoids the floor(x + 0.5) trap near 0.49999997.
    whole = torch.trunc(x)
    frac = x - whole
    return whole + torch.sign(x) * (frac.abs() >= 0.5).to(x.dtype)


# Below this absmax a channel's scale (absmax/128) rounds to float16 zero: its outputs would all be 0.
_UNDERFLOW_ABSMAX = 128 * 2.0**-25


def check_quantizable(weight: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Raise a ValueError/TypeError naming the problem unless ``weight`` is a finite 2-D float weight
    [out, in] within EETQ's range; returns its per-channel absmax (float32, [out])."""
    where = f"layer {name!r}: " if name else ""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{where}quantize_weight expects a 2-D nn.Linear weight [out, in], got {shape}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where}quantize_weight expects a float16, bfloat16 or float32 weight, got {weight.dtype}; "
            "cast it with weight.float() first"
        )
    if weight.numel() == 0:
        raise ValueError(f"{where}quantize_weight got an empty weight of shape {tuple(weight.shape)}")
    absmax = weight.detach().abs().amax(dim=1).to(torch.float32)
    if not torch.isfinite(absmax).all():
        raise ValueError(f"{where}the weight has inf or NaN values; fix the weight before quantizing")
    if bool((absmax * (1.0 / 128.0) > torch.finfo(torch.float16).max).any()):
        raise ValueError(f"{where}a channel's absmax/128 overflows float16; the weight is out of EETQ's range")
    return absmax


def quantize_weight(weight: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an nn.Linear weight [out, in] to EETQ int8.

    Returns ``(q, scales)``: ``q`` is int8 of shape [in, out] (EETQ's orientation, plain
    row-major layout) and ``scales`` is float16 of shape [out]. For fp16 input the result is
    bit-identical to EETQ's own quantizer; bf16 and fp32 input use the same math on their
    float32 values. ``name`` labels errors and the warning about channels whose scale underflows
    to zero.
    """
    check_quantizable(weight, name)
    w = weight.detach().to(torch.float32)

    # Per output channel: absmax over the row n of W (= column n of Wt), times 1/128, in fp32.
    scales_f32 = w.abs().amax(dim=1) * (1.0 / 128.0)

    # Divide by the fp32 scale (not the fp16-rounded one), round half away from zero, clamp.
    # An all-zero channel gives 0/0 = NaN; EETQ's clamp order maps NaN to +127.
    ratio = w / scales_f32[:, None]
    q = _round_half_away_from_zero(ratio).clamp_(-128.0, 127.0)
    q = torch.nan_to_num_(q, nan=127.0)
    scales = scales_f32.to(torch.float16)
    underflow = int(((scales_f32 > 0) & (scales == 0)).sum())
    if underflow:
        where = f"layer {name!r}" if name else "quantize_weight"
        warnings.warn(
            f"{where}: {underflow} output channel(s) have weights below {_UNDERFLOW_ABSMAX:.1e} in absolute value, "
            "so their float16 scale is 0 and their outputs will be 0; rescale the weights or leave this layer "
            "unquantized",
            RuntimeWarning,
            stacklevel=2,
        )
    return q.to(torch.int8).t().contiguous(), scales


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dequantize an int8 [in, out] matrix with its [out] scales to a float weight [out, in].

    ``float16`` reproduces EETQ exactly: ``fp16(q) * scale`` rounded once to fp16. Other dtypes
    get the exact product (an int8 times an fp16 is exact in float32) cast to ``dtype``.
    """
    product = q.t().to(torch.float32) * scales.to(torch.float32)[:, None]
    return product.to(dtype)
