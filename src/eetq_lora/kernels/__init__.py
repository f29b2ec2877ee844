"""The one dispatch point for EETQ int8 weight-only matmuls (forward and input gradient).

Compute dtype (see ``policy``): by default a matmul never runs in a dtype less precise than its
input. float32 computes in float32, bfloat16 in bfloat16, float16 in float16 on CUDA and in
float32 on CPU. ``set_compute_dtype(torch.bfloat16)`` (process-wide) or ``with
compute_dtype(torch.bfloat16):`` opts float32/float16 inputs into bfloat16 GEMMs, about 4x
faster on CPU for about 1.5e-3 extra relative error (the int8 weight alone costs about 8.5e-3);
``torch.float32`` forces float32 everywhere. Results always come back in the input's dtype, and
a backward pass uses the compute dtype of its forward.

Paths, by device, compute dtype and M (rows of the 2-D activation or gradient):

- ``cpu-stream``: CPU, M <= ``STREAM_MAX_ROWS[op, compute dtype]`` (32 to 128). Compiled kernels
  stream the int8 weight once and accumulate in float32: from exact activations for float32
  compute (and for M < 4), from bfloat16 activations with the CPU's bfloat16 dot products for
  bfloat16 compute.
- ``cpu-tiled``: CPU, larger M. A few MiB of the weight at a time is dequantized into a reused
  buffer of the compute dtype, then that dtype's GEMM runs on it.
- ``cpu-int8pack``: CPU without a C compiler, bfloat16 forward, M <= ``INT8PACK_MAX_ROWS``, a
  weight stored [out, in]-contiguous (torch's ``_weight_int8pack_mm``).
- ``cuda-triton``: CUDA, float16/bfloat16 compute, M < ``CUDA_DEQUANT_MIN_ROWS``, Triton
  installed: the fused w8a16 kernel reads the int8 weight directly (``triton_kernels``).
- ``cuda-dequant``: CUDA with Triton, larger M or float32 compute: one Triton pass writes the
  float weight (freed after the call), then cuBLAS runs the GEMM.
- ``reference``: everything else (CUDA without Triton, other devices, ``EETQ_LORA_KERNELS=reference``):
  ``reference.py``, the pure-torch path every fast path is tested against.

Without a C compiler the CPU paths run on torch operations alone, after one warning.

Autograd saves only the int8 weight and its scales: no dequantized copy outlives a call.
"""

from __future__ import annotations

import warnings

import torch

from . import cpu, cpu_library, decode, reference
from .policy import compute_dtype, get_compute_dtype, resolve_compute_dtype, set_compute_dtype

__all__ = [
    "compute_dtype",
    "compute_dtype_for",
    "get_compute_dtype",
    "int8_linear",
    "matmul_forward",
    "matmul_grad_input",
    "select_path",
    "set_compute_dtype",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Largest M for the streaming kernels, by (op, compute dtype): past it a GEMM on dequantized tiles
# is faster (measured on a 2-core Zen 5 with AVX-512 BF16). float32 GEMMs are slow enough that the
# float32-FMA streaming kernels stay ahead much longer.
STREAM_MAX_ROWS = {
    ("forward", torch.bfloat16): 32,
    ("grad_input", torch.bfloat16): 32,
    ("forward", torch.float32): 128,
    ("grad_input", torch.float32): 128,
}
# Without the bfloat16 dot-product kernels (no AVX512-BF16), bfloat16 gradients leave sooner.
STREAM_MAX_ROWS_FLOAT32_KERNELS = {("grad_input", torch.bfloat16): 8}
INT8PACK_MAX_ROWS = 16
# From this M on CUDA, dequantize + cuBLAS beats the fused kernel (H200: at M=128 the fused
# forward took 2.4x a dense F.linear, while the one-pass dequantize costs about one M=1 read).
CUDA_DEQUANT_MIN_ROWS = 64

_triton_failed: list[str] = []


def _triton_usable() -> bool:
    if _triton_failed:
        return False
    from . import triton_kernels

    return triton_kernels.is_available()


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype the int8 matmul runs in for activations like ``x`` under the current policy."""
    return resolve_compute_dtype(x.dtype, x.device.type)


def _stream_limit(op: str, compute: torch.dtype) -> int:
    if not cpu_library.has_bf16_dot() and (op, compute) in STREAM_MAX_ROWS_FLOAT32_KERNELS:
        return STREAM_MAX_ROWS_FLOAT32_KERNELS[(op, compute)]
    return STREAM_MAX_ROWS.get((op, compute), 0)


def select_path(device_type: str, compute: torch.dtype, rows: int, qweight: torch.Tensor, op: str = "forward") -> str:
    """Name of the path that runs ``op`` (``"forward"`` or ``"grad_input"``) for these operands."""
    if decode.reference_forced():
        return "reference"
    if device_type == "cpu":
        if cpu_library.is_available():
            return "cpu-stream" if rows <= _stream_limit(op, compute) else "cpu-tiled"
        if (
            op == "forward"
            and compute == torch.bfloat16
            and rows <= INT8PACK_MAX_ROWS
            and cpu.int8pack_supported(qweight)
        ):
            return "cpu-int8pack"
        return "cpu-tiled"
    if device_type == "cuda" and compute in _FLOAT_DTYPES and _triton_usable():
        if compute == torch.float32 or rows >= CUDA_DEQUANT_MIN_ROWS:
            return "cuda-dequant"
        return "cuda-triton"
    return "reference"


def _run_triton(path: str, op: str, a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype):
    from . import triton_kernels

    try:
        if path == "cuda-dequant":
            weight_t = triton_kernels.dequantize(qweight, scales, compute)  # [in, out]
            return a.to(compute) @ (weight_t if op == "forward" else weight_t.t())
        if op == "forward":
            return triton_kernels.forward(a.to(compute), qweight, scales)
        return triton_kernels.grad_input(a.to(compute), qweight, scales)
    except Exception as error:  # noqa: BLE001 - a GPU Triton cannot compile for must not break training
        _triton_failed.append(str(error))
        first_line = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(
            f"eetq_lora: the Triton int8 kernel failed ({type(error).__name__}: {first_line}); "
            "using the reference path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# The CPU path functions in ``cpu``, by (op, path), looked up at call time; both ops share the
# CUDA and reference fallbacks.
_CPU_PATHS = {
    ("forward", "cpu-stream"): "stream_forward",
    ("forward", "cpu-tiled"): "tiled_forward",
    ("forward", "cpu-int8pack"): "int8pack_forward",
    ("grad_input", "cpu-stream"): "stream_grad_input",
    ("grad_input", "cpu-tiled"): "tiled_grad_input",
}
_REFERENCE = {"forward": reference.forward, "grad_input": reference.grad_input}


def _matmul(op: str, a2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype | None):
    compute = compute or compute_dtype_for(a2d)
    path = select_path(a2d.device.type, compute, a2d.shape[0], qweight, op)
    cpu_path = _CPU_PATHS.get((op, path))
    if cpu_path is not None:
        out = getattr(cpu, cpu_path)(a2d, qweight, scales, compute)
    else:
        out = _run_triton(path, op, a2d, qweight, scales, compute) if path.startswith("cuda-") else None
        if out is None:
            out = _REFERENCE[op](a2d, qweight, scales, compute)
    return out.to(a2d.dtype)


def matmul_forward(
    x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype | None = None
) -> torch.Tensor:
    """y [M, out] = x2d [M, in] @ dequantized Wt, returned in x2d's dtype (not differentiable)."""
    return _matmul("forward", x2d, qweight, scales, compute)


def matmul_grad_input(
    grad2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype | None = None
) -> torch.Tensor:
    """dx [M, in] = grad2d [M, out] @ dequantized W, returned in grad2d's dtype (not differentiable)."""
    return _matmul("grad_input", grad2d, qweight, scales, compute)


class _Int8LinearFunction(torch.autograd.Function):
    # Saves only the module's own int8 weight and scales: no dequantized copy outlives a call.
    @staticmethod
    def forward(ctx, x2d, qweight, scales, compute, plan):
        ctx.save_for_backward(qweight, scales)
        ctx.compute, ctx.plan = compute, plan
        out = decode.forward(plan, x2d) if plan is not None else None
        return out if out is not None else matmul_forward(x2d, qweight, scales, compute)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scales = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        plan = ctx.plan
        if plan is not None and not plan.matches(qweight, scales):
            # The weight was freed and gathered again since the forward (FSDP2, ZeRO-3): the
            # forward's plan points at memory that is no longer this weight.
            plan = decode.StreamPlan(qweight, scales)
            plan = plan if plan.usable else None
        grad_x = decode.grad_input(plan, grad_out) if plan is not None else None
        if grad_x is None:
            grad_x = matmul_grad_input(grad_out, qweight, scales, ctx.compute)
        return grad_x, None, None, None, None


def _check_weight(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    # The layer's own tensors, before any path reads them: a kernel given another device's memory
    # (a meta weight never loaded, say) or too few scales would read out of bounds.
    for name, tensor in (("weight", qweight), ("weight_scales", scales), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            hint = "load its weights first" if tensor.device.type == "meta" else "move the layer with model.to(device)"
            raise ValueError(f"EetqLinear's {name} is on {tensor.device} but its input is on {x.device}; {hint}")
    out_features = qweight.shape[1]
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(
            f"EetqLinear's weight must be a 2-D int8 matrix [in, out], got {qweight.dtype} {list(qweight.shape)}"
        )
    if scales.dim() != 1 or scales.shape[0] != out_features or not scales.is_floating_point():
        raise ValueError(
            f"EetqLinear's weight_scales must hold one float value per output channel ({out_features}), "
            f"got {scales.dtype} of shape {list(scales.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"EetqLinear's bias must have {out_features} values, got shape {list(bias.shape)}")


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    plan: decode.StreamPlan | None = None,
) -> torch.Tensor:
    """EETQ linear on activations of any leading shape; differentiable in ``x`` (and ``bias`` if it trains).

    ``plan`` is the caller's cached ``decode.StreamPlan`` for ``qweight`` and ``scales`` (a layer
    keeps one); without it a CPU call with few rows builds one.
    """
    if plan is None and x.is_cpu and x.numel() <= decode.MAX_ROWS * qweight.shape[0]:
        plan = decode.StreamPlan(qweight, scales)
        plan = plan if plan.usable else None
    if plan is not None and not (x.requires_grad and torch.is_grad_enabled()):
        # Decoding: one compiled call that checks the activation itself, before any other step.
        out = decode.forward(plan, x)
        if out is not None:
            return out if bias is None else out + bias.to(out.dtype)
    if not torch.is_floating_point(x) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"EetqLinear expects float16, bfloat16 or float32 input, got {x.dtype}")
    in_features, out_features = qweight.shape
    _check_weight(x, qweight, scales, bias)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"EetqLinear expects input whose last dimension is in_features={in_features}, got shape {tuple(x.shape)}"
        )
    x2d = x.reshape(-1, in_features)
    if x2d.requires_grad and torch.is_grad_enabled():
        out = _Int8LinearFunction.apply(x2d, qweight, scales, compute_dtype_for(x2d), plan)
    else:
        out = matmul_forward(x2d, qweight, scales)
    out = out.reshape(*x.shape[:-1], out_features)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out
