"""The one place that chooses how an EETQ int8 weight-only matmul runs (forward and input gradient).

Paths, by device, compute dtype (``policy``) and M (rows of the 2-D activation or gradient):

- ``one-call``: CPU, at most ``ONE_CALL_MAX_ROWS`` rows, a layer whose weight streams
  (``stream.StreamPlan``): one compiled call straight from the layer's tensors, the LoRA adapter
  fused in when decoding (``fused_adapter_forward``).
- ``cpu-stream``: CPU, M <= ``STREAM_MAX_ROWS[op, compute dtype]``. Compiled kernels stream the int8
  weight once and accumulate in float32 (``cpu.stream_*``).
- ``cpu-tiled``: CPU, larger M: that dtype's GEMM on dequantized tiles of the weight (``cpu.tiled_*``).
- ``cpu-int8pack``: CPU without a C compiler, bfloat16 forward, M <= ``INT8PACK_MAX_ROWS``, a weight
  stored [out, in]-contiguous (torch's ``_weight_int8pack_mm``).
- ``cuda-triton``: CUDA, float16/bfloat16 compute, M < ``CUDA_DEQUANT_MIN_ROWS``, Triton installed:
  the fused w8a16 kernel reads the int8 weight directly (``triton_kernels``).
- ``cuda-dequant``: CUDA with Triton, larger M or float32 compute: one Triton pass writes the float
  weight (freed after the call), then cuBLAS runs the GEMM.
- ``reference``: everything else (CUDA without Triton, other devices, ``EETQ_LORA_KERNELS=reference``):
  the pure-torch path every fast path is tested against (``reference``).

Without a C compiler the CPU paths run on torch operations alone, after one warning. Autograd saves
only the int8 weight and its scales: no dequantized copy outlives a call.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..format.quantize import FLOAT_DTYPES
from . import cpu, cpu_library, reference, stream
from .policy import resolve_compute_dtype
from .stream import StreamPlan

# Largest M for the one-call path; above it the other paths' tiling pays off.
ONE_CALL_MAX_ROWS = 3
# Largest M for the streaming kernels, by (op, compute dtype): past it a GEMM on dequantized tiles
# is faster on CPUs with AVX-512 BF16. float32 GEMMs are slow enough that the float32-FMA streaming
# kernels stay ahead much longer.
STREAM_MAX_ROWS = {
    ("forward", torch.bfloat16): 32,
    ("grad_input", torch.bfloat16): 32,
    ("forward", torch.float32): 128,
    ("grad_input", torch.float32): 128,
}
# The same on CPUs without the bfloat16 dot-product kernels (no AVX512-BF16, such as AVX2-only
# ones): their bfloat16 GEMMs are emulated, far slower than streaming, and their narrower float32
# streaming kernels meet the float32 GEMM sooner.
STREAM_MAX_ROWS_FLOAT32_KERNELS = {
    ("forward", torch.bfloat16): 128,
    ("grad_input", torch.bfloat16): 128,
    ("forward", torch.float32): 48,
    ("grad_input", torch.float32): 48,
}
INT8PACK_MAX_ROWS = 16
# From this M on CUDA, dequantize + cuBLAS beats the fused kernel: the one-pass dequantize costs
# about one M=1 read, while the fused kernel's tiles are sized for few rows.
CUDA_DEQUANT_MIN_ROWS = 64
REFERENCE_VARIABLE = "EETQ_LORA_KERNELS"

Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


class KernelPath(NamedTuple):
    """A way to run the matmul: its name and one function per op, each ``(a2d, qweight, scales, compute)``."""

    name: str
    forward: Matmul
    grad_input: Matmul

    def __str__(self) -> str:
        return self.name


_triton_failed: list[str] = []


def _triton_matmul(op: str) -> Matmul:
    def run(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        from . import triton_kernels

        return _guarded_triton(op, getattr(triton_kernels, op), a, qweight, scales, compute)

    return run


def _dequant_matmul(op: str) -> Matmul:
    def run(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        from . import triton_kernels

        def gemm(a, qweight, scales):
            weight_t = triton_kernels.dequantize(qweight, scales, compute)  # [in, out]
            return a @ (weight_t if op == "forward" else weight_t.t())

        return _guarded_triton(op, gemm, a, qweight, scales, compute)

    return run


def _guarded_triton(op, function, a, qweight, scales, compute):
    try:
        return function(a.to(compute), qweight, scales)
    except Exception as error:  # noqa: BLE001 - a GPU Triton cannot compile for must not break training
        _triton_failed.append(str(error))
        first_line = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(
            f"eetq_lora: the Triton int8 kernel failed ({type(error).__name__}: {first_line}); "
            "using the reference path from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        return getattr(reference, op)(a, qweight, scales, compute)


REFERENCE = KernelPath("reference", reference.forward, reference.grad_input)
CPU_STREAM = KernelPath("cpu-stream", cpu.stream_forward, cpu.stream_grad_input)
CPU_TILED = KernelPath("cpu-tiled", cpu.tiled_forward, cpu.tiled_grad_input)
# Forward only: select_path never picks it for a gradient.
CPU_INT8PACK = KernelPath("cpu-int8pack", cpu.int8pack_forward, reference.grad_input)
CUDA_TRITON = KernelPath("cuda-triton", _triton_matmul("forward"), _triton_matmul("grad_input"))
CUDA_DEQUANT = KernelPath("cuda-dequant", _dequant_matmul("forward"), _dequant_matmul("grad_input"))


def _c_getenv() -> Callable[[bytes], bytes | None] | None:
    # The C library's getenv sees every change made through os.environ (which calls putenv) in one
    # C call, where os.environ.get runs three Python frames: this is read on every decoding call.
    # PyDLL keeps the GIL held, so no other thread's putenv runs during the read.
    try:
        getenv = ctypes.PyDLL(None).getenv
    except (OSError, AttributeError):
        return None
    getenv.argtypes, getenv.restype = [ctypes.c_char_p], ctypes.c_char_p
    return getenv


_getenv = _c_getenv() if os.name == "posix" else None
_REFERENCE_KEY = REFERENCE_VARIABLE.encode()


def reference_forced() -> bool:
    """Whether ``EETQ_LORA_KERNELS=reference`` sends every matmul to the pure-torch reference path."""
    if _getenv is None:
        return os.environ.get(REFERENCE_VARIABLE, "").strip().lower() == "reference"
    value = _getenv(_REFERENCE_KEY)
    return value is not None and value.strip().lower() == b"reference"


def _triton_usable() -> bool:
    if _triton_failed:
        return False
    from . import triton_kernels

    return triton_kernels.is_available()


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype the int8 matmul runs in for activations like ``x`` under the current policy."""
    return resolve_compute_dtype(x.dtype, x.device.type)


def stream_limit(op: str, compute: torch.dtype) -> int:
    """Largest M the streaming kernels take for ``op`` in ``compute`` on this CPU (0: never)."""
    limits = STREAM_MAX_ROWS if cpu_library.has_bf16_dot() else STREAM_MAX_ROWS_FLOAT32_KERNELS
    return limits.get((op, compute), 0)


def select_path(
    device_type: str, compute: torch.dtype, rows: int, qweight: torch.Tensor, op: str = "forward"
) -> KernelPath:
    """The path that runs ``op`` (``"forward"`` or ``"grad_input"``) for these operands."""
    if reference_forced():
        return REFERENCE
    if device_type == "cpu":
        if cpu_library.is_available():
            return CPU_STREAM if rows <= stream_limit(op, compute) else CPU_TILED
        if (
            op == "forward"
            and compute == torch.bfloat16
            and rows <= INT8PACK_MAX_ROWS
            and cpu.int8pack_supported(qweight)
        ):
            return CPU_INT8PACK
        return CPU_TILED
    if device_type == "cuda" and compute in FLOAT_DTYPES and _triton_usable():
        return CUDA_DEQUANT if compute == torch.float32 or rows >= CUDA_DEQUANT_MIN_ROWS else CUDA_TRITON
    return REFERENCE


def matmul_forward(
    x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype | None = None
) -> torch.Tensor:
    """y [M, out] = x2d [M, in] @ dequantized Wt, returned in x2d's dtype (not differentiable)."""
    compute = compute or compute_dtype_for(x2d)
    path = select_path(x2d.device.type, compute, x2d.shape[0], qweight, "forward")
    return path.forward(x2d, qweight, scales, compute).to(x2d.dtype)


def matmul_grad_input(
    grad2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype | None = None
) -> torch.Tensor:
    """dx [M, in] = grad2d [M, out] @ dequantized W, returned in grad2d's dtype (not differentiable)."""
    compute = compute or compute_dtype_for(grad2d)
    path = select_path(grad2d.device.type, compute, grad2d.shape[0], qweight, "grad_input")
    return path.grad_input(grad2d, qweight, scales, compute).to(grad2d.dtype)


def _one_call_rows(a: torch.Tensor, features: int) -> int:
    # Rows of ``a`` seen as [rows, features] when the one-call path takes it, else 0: another device,
    # dtype or width, a non-contiguous layout, too many rows, or the reference path forced.
    if not a.is_cpu or not a.ndim or a.shape[-1] != features or not a.is_contiguous():
        return 0
    if a.dtype not in FLOAT_DTYPES:
        return 0
    rows = a.numel() // features if features else 0
    if not 0 < rows <= ONE_CALL_MAX_ROWS or reference_forced():
        return 0
    return rows


def one_call_forward(plan: StreamPlan, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ Wt`` in ``x``'s dtype and shape through the one-call path, or None where it does not apply."""
    rows = _one_call_rows(x, plan.in_features)
    return stream.forward(plan, x, rows) if rows else None


def one_call_grad_input(plan: StreamPlan, grad: torch.Tensor) -> torch.Tensor | None:
    """``grad @ W`` in ``grad``'s dtype and shape through the one-call path, or None where it does not apply."""
    rows = _one_call_rows(grad, plan.out_features)
    return stream.grad_input(plan, grad, rows) if rows else None


def fused_adapter_forward(
    plan: StreamPlan, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """``x @ Wt + lora_b(lora_a(x)) * scaling`` with PEFT's roundings (adapter in float32, its output
    cast to ``x``'s dtype, scaled, then added) in one call, or None where that does not apply.

    The adapter must be bias-free contiguous float32 CPU ``A [rank, in]`` and ``B [out, rank]``, and
    nothing may need a gradient: this path has no backward.
    """
    if (
        lora_a.dtype is not torch.float32
        or lora_b.dtype is not torch.float32
        or not lora_a.is_cpu
        or not lora_b.is_cpu
        or not lora_a.is_contiguous()
        or not lora_b.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad))
    ):
        return None
    rank = lora_a.shape[0]
    if tuple(lora_a.shape) != (rank, plan.in_features) or tuple(lora_b.shape) != (plan.out_features, rank):
        return None
    rows = _one_call_rows(x, plan.in_features)
    return stream.forward(plan, x, rows, stream.adapter_operands(plan, lora_a, lora_b, scaling)) if rows else None


class _Int8LinearFunction(torch.autograd.Function):
    # Saves only the module's own int8 weight and scales: no dequantized copy outlives a call.
    @staticmethod
    def forward(ctx, x2d, qweight, scales, compute, plan):
        ctx.save_for_backward(qweight, scales)
        ctx.compute, ctx.plan = compute, plan
        out = one_call_forward(plan, x2d) if plan is not None else None
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
            plan = stream.plan_for(qweight, scales)
        grad_x = one_call_grad_input(plan, grad_out) if plan is not None else None
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
    plan: StreamPlan | None = None,
) -> torch.Tensor:
    """EETQ linear on activations of any leading shape; differentiable in ``x`` (and ``bias`` if it trains).

    ``plan`` is the caller's cached ``stream.StreamPlan`` for ``qweight`` and ``scales`` (a layer
    keeps one); without it a CPU call with few rows builds one.
    """
    if plan is None and x.is_cpu and x.numel() <= ONE_CALL_MAX_ROWS * qweight.shape[0]:
        plan = stream.plan_for(qweight, scales)
    if plan is not None and not (x.requires_grad and torch.is_grad_enabled()):
        # Decoding: one compiled call that checks the activation itself, before any other step.
        out = one_call_forward(plan, x)
        if out is not None:
            return out if bias is None else out + bias.to(out.dtype)
    if not torch.is_floating_point(x) or x.dtype not in FLOAT_DTYPES:
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
