"""Triton w8a16 matmul for CUDA GPUs (sm75 to sm90): float16/bfloat16 activations, int8 weight.

One kernel computes ``C [M, P] = A [M, R] @ Wd [R, P]`` where ``Wd`` is the int8 weight with its
per-output-channel scale, read in place through strides, so the forward (``R = in``, ``P = out``,
scale on columns) and the input gradient (``R = out``, ``P = in``, scale on rows) share it. The
int8 tile converts exactly to the activation dtype; a column scale multiplies the float32
accumulator, a row scale is applied to the tile before the dot (that is the reference's
dequantized weight, rounded once). Small M splits the reduction over several programs so the
whole GPU streams the weight; partial sums go to a float32 buffer that a second small kernel
sums in a fixed order (deterministic, unlike atomics) and casts once. bfloat16 on pre-Ampere
GPUs, which have no bfloat16 tensor cores, runs the dot in float32, and so does Triton's
interpreter (its bfloat16 dot is wrong).

``dequantize`` writes the whole float weight in one pass over the int8 one; for large M the
dispatcher hands that to cuBLAS, which beats any int8-reading tile loop once the GEMM is
compute-bound.

Triton is optional: ``is_available()`` is false without it. ``TRITON_INTERPRET=1`` (set before
this module is imported) runs the kernel on CPU tensors through Triton's interpreter, which is
how CI tests it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available() -> bool:
    """Whether the kernel can run here: Triton imports and there is a CUDA GPU (or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch settings of one kernel launch."""

    block_m: int
    block_p: int
    block_r: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


if triton is not None:

    @triton.jit
    def _w8_matmul_kernel(
        a_ptr,
        q_ptr,
        s_ptr,
        c_ptr,
        M,
        P,
        R,
        r_per_split,
        stride_am,
        stride_ar,
        stride_qr,
        stride_qp,
        stride_cs,
        stride_cm,
        stride_cp,
        SCALE_ROWS: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_p = tl.cdiv(P, BLOCK_P)
        # Grouped ordering: neighbouring programs share weight tiles in L2.
        per_group = GROUP_M * grid_p
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_p = (pid % per_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        r_begin = split * r_per_split
        r_end = min(R, r_begin + r_per_split)
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < r_end),
                other=0.0,
            )
            q = tl.load(
                q_ptr + offs_r[:, None] * stride_qr + offs_p[None, :] * stride_qp,
                mask=(offs_r[:, None] < r_end) & (offs_p[None, :] < P),
                other=0,
            )
            if SCALE_ROWS:
                s = tl.load(s_ptr + offs_r, mask=offs_r < r_end, other=0.0).to(tl.float32)
                w = (q.to(tl.float32) * s[:, None]).to(a.dtype)
            else:
                w = q.to(tl.float32).to(a.dtype)  # int8 -> bfloat16 directly is wrong in the interpreter
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if not SCALE_ROWS:
            s = tl.load(s_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)
            acc = acc * s[None, :]
        c_ptrs = c_ptr + split * stride_cs + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_p[None, :] < P))

    @triton.jit
    def _bf16_bits(x):
        # float32 -> bfloat16 bits (as int16), rounded to nearest even; a NaN becomes torch's 0x7FC0
        # (the rounding add would carry a full-mantissa NaN into the sign bit or to zero).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _dequantize_kernel(
        q_ptr,
        s_ptr,
        out_ptr,
        R,
        P,
        stride_qr,
        stride_qp,
        BF16_BITS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        # out [R, P] (contiguous) = q [R, P] * s [P]: the product is exact in float32, rounded once.
        # BF16_BITS: out is bfloat16 seen as int16, rounded to nearest even by integer arithmetic
        # (Triton's interpreter truncates a float32 -> bfloat16 cast; the GPU rounds; this is both).
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (offs_r[:, None] < R) & (offs_p[None, :] < P)
        q = tl.load(q_ptr + offs_r[:, None] * stride_qr + offs_p[None, :] * stride_qp, mask=mask, other=0)
        s = tl.load(s_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[None, :]
        result = _bf16_bits(w) if BF16_BITS else w.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_r[:, None] * P + offs_p[None, :], result, mask=mask)

    @triton.jit
    def _sum_splits_kernel(partial_ptr, out_ptr, n, splits, stride_split, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
        # out[i] = sum over splits of partial[split, i], in float32, rounded once to out's dtype.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(0, splits):
            total += tl.load(partial_ptr + split * stride_split + offs, mask=mask, other=0.0)
        result = _bf16_bits(total) if BF16_BITS else total.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, result, mask=mask)


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[tuple[int, int], int]:
    properties = torch.cuda.get_device_properties(index)
    return (properties.major, properties.minor), properties.multi_processor_count


def _cuda_facts(device: torch.device) -> tuple[tuple[int, int], int]:
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())


def _capability(device: torch.device) -> tuple[int, int]:
    return _cuda_facts(device)[0] if device.type == "cuda" else (9, 0)


def _processor_count(device: torch.device) -> int:
    return _cuda_facts(device)[1] if device.type == "cuda" else 4


def choose_config(m: int, p: int, r: int, device: torch.device) -> Config:
    """Tile sizes for an M x P output with reduction R: small M splits the reduction to fill the GPU."""
    if m <= 16:
        base = Config(block_m=16, block_p=64, block_r=128, num_warps=4, num_stages=4)
    elif m <= 64:
        base = Config(block_m=64, block_p=64, block_r=64, num_warps=4, num_stages=4)
    else:
        base = Config(block_m=128, block_p=128, block_r=64, num_warps=8, num_stages=3)
    programs = triton.cdiv(m, base.block_m) * triton.cdiv(p, base.block_p)
    wanted = 4 * _processor_count(device)
    split = max(1, min(triton.cdiv(wanted, programs), triton.cdiv(r, base.block_r), 32))
    # Pre-Ampere GPUs have 64 KiB of shared memory per block and no asynchronous copies to pipeline.
    stages = 2 if _capability(device) < (8, 0) else base.num_stages
    return Config(base.block_m, base.block_p, base.block_r, split, base.num_warps, stages, base.group_m)


def _needs_fp32_dot(a: torch.Tensor) -> bool:
    if a.dtype != torch.bfloat16:
        return False
    if a.device.type != "cuda":
        # Triton's interpreter computes bfloat16 dots on the raw bits; float32 dots are right.
        return True
    return _capability(a.device) < (8, 0)


def w8_matmul(
    a: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    reduce_over_inputs: bool,
    config: Config | None = None,
) -> torch.Tensor:
    """``a @ Wt`` (``reduce_over_inputs=True``, forward) or ``a @ W`` (input gradient), in ``a``'s dtype.

    ``qweight`` is the int8 [in, out] weight with any strides and ``scales`` its [out] scales;
    ``a`` is float16 or bfloat16, 2-D.
    """
    if triton is None:
        raise RuntimeError("eetq_lora's Triton kernel needs the triton package")
    if a.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton int8 kernel takes float16 or bfloat16 activations, got {a.dtype}")
    in_features, out_features = qweight.shape
    if reduce_over_inputs:  # C = A [M, in] @ Wd [in, out]: Wd[r, p] = qweight[r, p] * s[p]
        r, p = in_features, out_features
        stride_qr, stride_qp = qweight.stride(0), qweight.stride(1)
    else:  # C = A [M, out] @ Wd [out, in]: Wd[r, p] = qweight[p, r] * s[r]
        r, p = out_features, in_features
        stride_qr, stride_qp = qweight.stride(1), qweight.stride(0)
    m = a.shape[0]
    if m == 0:
        return torch.zeros(m, p, dtype=a.dtype, device=a.device)
    config = config or choose_config(m, p, r, a.device)
    r_per_split = triton.cdiv(triton.cdiv(r, config.split), config.block_r) * config.block_r
    split = triton.cdiv(r, r_per_split) if r else 1
    if split == 1:
        out = torch.empty(m, p, dtype=a.dtype, device=a.device)
        stride_cs = 0
    else:
        out = torch.empty(split, m, p, dtype=torch.float32, device=a.device)
        stride_cs = out.stride(0)
    stride_cm, stride_cp = out.stride(-2), out.stride(-1)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(p, config.block_p), split)
    _w8_matmul_kernel[grid](
        a,
        qweight,
        scales,
        out,
        m,
        p,
        r,
        r_per_split,
        a.stride(0),
        a.stride(1),
        stride_qr,
        stride_qp,
        stride_cs,
        stride_cm,
        stride_cp,
        SCALE_ROWS=not reduce_over_inputs,
        DOT_FP32=_needs_fp32_dot(a),
        BLOCK_M=config.block_m,
        BLOCK_P=config.block_p,
        BLOCK_R=config.block_r,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out if split == 1 else _sum_splits(out, a.dtype)


def _sum_splits(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    splits, m, p = partial.shape
    out = torch.empty(m, p, dtype=dtype, device=partial.device)
    block = 1024
    bf16_bits = dtype == torch.bfloat16
    target = out.view(torch.int16) if bf16_bits else out
    grid = (triton.cdiv(m * p, block),)
    _sum_splits_kernel[grid](partial, target, m * p, splits, partial.stride(0), BF16_BITS=bf16_bits, BLOCK=block)
    return out


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized transposed weight Wt [in, out] in ``dtype``, written in one pass over the int8 weight.

    ``fp16(q * scale)`` for float16 (EETQ's own rounding); the exact product rounded once otherwise.
    """
    if triton is None:
        raise RuntimeError("eetq_lora's Triton kernel needs the triton package")
    in_features, out_features = qweight.shape
    out = torch.empty(in_features, out_features, dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    block_r, block_p = 32, 128
    grid = (triton.cdiv(in_features, block_r), triton.cdiv(out_features, block_p))
    bf16_bits = dtype == torch.bfloat16
    _dequantize_kernel[grid](
        qweight,
        scales,
        out.view(torch.int16) if bf16_bits else out,
        in_features,
        out_features,
        qweight.stride(0),
        qweight.stride(1),
        BF16_BITS=bf16_bits,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
    )
    return out


def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [M, out] = x [M, in] @ dequantized Wt, in x's dtype (float16 or bfloat16)."""
    return w8_matmul(x, qweight, scales, reduce_over_inputs=True)


def grad_input(grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """dx [M, in] = grad [M, out] @ dequantized W, in grad's dtype (float16 or bfloat16)."""
    return w8_matmul(grad, qweight, scales, reduce_over_inputs=False)
