"""CPU decoding: a layer's int8 matmul (and its one adapter) in one compiled call, with few Python steps.

Token-by-token generation runs every layer at M=1 with cold caches: streaming the previous
layer's weight evicted the interpreter's and torch's working set. Each Python-level step of a call
(a tensor attribute, a module attribute, an environment lookup) then costs several microseconds,
and the layer call around the M=1 kernel cost 0.1-0.15 ms, a third of a 4096x4096 matmul.

A ``StreamPlan`` holds what a layer's weight contributes to the call (pointers, sizes, and the
checks that the weight suits the kernel), computed once and cached on the layer; a call only
checks its activation. The cache is keyed by the weight and scale tensors and their data
pointers (held weakly), so replacing either (``layer.weight = ...``, ``.data = ...``, ``.to()``)
rebuilds it.

The kernel is ``eetq_stream`` in float32 arithmetic from exact float32, bfloat16 or float16
activations, its result rounded once to their dtype: the path ``select_path`` picks for CPU
activations below ``cpu.BF16_DOT_MIN_ROWS`` rows. Training steps with that few rows take it too,
for the forward and the input gradient.
"""

from __future__ import annotations

import os
import weakref

import torch

from . import cpu_library, native

# Rows the one-call path takes: below this the dispatcher streams from exact activations too.
MAX_ROWS = 3
_PLAN_ATTRIBUTE = "_eetq_stream_plan"
_FLOAT32, _FLOAT16 = torch.float32, torch.float16
_STREAM_FORMATS = native.STREAM_FORMATS

# os.environ.get costs four Python frames; the mapping behind os.environ is read directly when the
# variable is absent (the usual case) and through os.environ otherwise.
_RAW_ENVIRON = getattr(os.environ, "_data", None)
_KERNELS_VARIABLE = "EETQ_LORA_KERNELS"
_RAW_KERNELS_KEY = os.environ.encodekey(_KERNELS_VARIABLE) if hasattr(os.environ, "encodekey") else None
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def reference_forced() -> bool:
    """Whether ``EETQ_LORA_KERNELS=reference`` sends every matmul to the pure-torch reference path."""
    if _RAW_ENVIRON is not None and _RAW_KERNELS_KEY is not None and _RAW_KERNELS_KEY not in _RAW_ENVIRON:
        return False
    return os.environ.get(_KERNELS_VARIABLE, "").strip().lower() == "reference"


def autocast_active() -> bool:
    """Whether CPU autocast (or any autocast, where torch cannot say which cheaply) is on."""
    return _any_autocast() if _any_autocast is not None else torch.is_autocast_enabled("cpu")


class StreamPlan:
    """One layer's weight-side arguments of ``eetq_stream``; ``usable`` is False where it cannot stream."""

    __slots__ = ("weight", "scales", "weight_ptr", "scales_ptr", "in_features", "out_features", "usable", "kernel")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        # Held weakly: a stale plan must not keep a replaced weight alive.
        self.weight, self.scales = weakref.ref(qweight), weakref.ref(scales)
        self.weight_ptr = qweight.data_ptr() if qweight.device.type == "cpu" else -1
        self.scales_ptr = scales.data_ptr() if scales.device.type == "cpu" else -1
        self.in_features, self.out_features = qweight.shape if qweight.dim() == 2 else (0, 0)
        # qweight [in, out] must be row-major (EetqLinear's storage): the forward sums over its rows.
        self.usable = (
            qweight.device.type == "cpu"
            and scales.device.type == "cpu"
            and qweight.dtype == torch.int8
            and qweight.dim() == 2
            and qweight.stride(1) == 1
            and qweight.stride(0) == self.out_features
            and scales.dtype == _FLOAT16
            and scales.is_contiguous()
            and tuple(scales.shape) == (self.out_features,)
            and cpu_library.is_available()
        )
        self.kernel = cpu_library.library().eetq_stream if self.usable else None

    def matches(self, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether this plan still describes these tensors' memory: same objects, storage, shape and strides.

        Sharding engines (FSDP2, ZeRO-3) free a layer's gathered weight after its forward and gather
        it again, at another address, for the backward: a plan from the forward is stale there.
        """
        return (
            self.weight() is qweight
            and self.scales() is scales
            and qweight.data_ptr() == self.weight_ptr
            and scales.data_ptr() == self.scales_ptr
            and qweight.shape == (self.in_features, self.out_features)
            and qweight.stride() == (self.out_features, 1)
            and scales.shape == (self.out_features,)
        )

    def __reduce__(self):
        # A copied or pickled layer rebuilds its own plan: this one points at the original's memory.
        return (_no_plan, ())


def _no_plan() -> None:
    return None


def layer_plan(layer: torch.nn.Module, qweight: torch.Tensor, scales: torch.Tensor) -> StreamPlan | None:
    """``layer``'s cached plan for these weight and scale tensors (rebuilt when they change); None if unusable."""
    plan = layer.__dict__.get(_PLAN_ATTRIBUTE)
    if plan is None or not (
        plan.matches(qweight, scales) if plan.usable else (plan.weight() is qweight and plan.scales() is scales)
    ):
        plan = StreamPlan(qweight, scales)
        layer.__dict__[_PLAN_ATTRIBUTE] = plan
    return plan if plan.usable else None


def forget_plan(layer: torch.nn.Module) -> None:
    """Drop ``layer``'s cached plan (its weight moved or was replaced)."""
    layer.__dict__.pop(_PLAN_ATTRIBUTE, None)


def _rows(a: torch.Tensor, features: int) -> int:
    # Rows of ``a`` seen as [rows, features], or 0 when this path does not take it: another device,
    # dtype or width, a non-contiguous layout, or too many rows.
    if not a.is_cpu or not a.ndim or a.shape[-1] != features or not a.is_contiguous():
        return 0
    if a.dtype not in _STREAM_FORMATS:
        return 0
    rows = a.numel() // features if features else 0
    return rows if 0 < rows <= MAX_ROWS else 0


def forward(
    plan: StreamPlan, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float] | None = None
) -> torch.Tensor | None:
    """``x @ Wt`` (plus ``lora=(A, B, scaling)``'s output with PEFT's roundings) in ``x``'s dtype and shape.

    None where this path does not apply; the caller then takes the general dispatch.
    """
    rows = _rows(x, plan.in_features)
    if not rows or reference_forced():
        return None
    return _call(plan, 1, x, rows, plan.out_features, lora)


def forward_with_adapter(
    plan: StreamPlan, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """``x @ Wt + lora_b(lora_a(x)) * scaling`` with PEFT's roundings (adapter in float32, its output
    cast to ``x``'s dtype, scaled, then added), or None where this path does not apply.

    The adapter must be bias-free contiguous float32 CPU ``A [rank, in]`` and ``B [out, rank]``, and
    nothing may need a gradient: this path has no backward.
    """
    if (
        lora_a.dtype is not _FLOAT32
        or lora_b.dtype is not _FLOAT32
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
    return forward(plan, x, (lora_a, lora_b, scaling))


def grad_input(plan: StreamPlan, grad: torch.Tensor) -> torch.Tensor | None:
    """``grad @ W`` in ``grad``'s dtype and shape, or None where this path does not apply."""
    rows = _rows(grad, plan.out_features)
    if not rows or reference_forced():
        return None
    return _call(plan, 0, grad, rows, plan.in_features, None)


def _call(plan: StreamPlan, rowaxpy: int, a: torch.Tensor, rows: int, width: int, lora) -> torch.Tensor:
    dtype = a.dtype
    data_format = _STREAM_FORMATS[dtype]
    shape = list(a.shape)
    shape[-1] = width
    out = torch.empty(shape, dtype=dtype)
    lora_a, lora_b, scaling = lora if lora is not None else (None, None, 0.0)
    status = plan.kernel(
        rowaxpy,
        a.data_ptr(),
        data_format,
        rows,
        a.shape[-1],
        plan.weight_ptr,
        plan.in_features,
        plan.out_features,
        plan.out_features,
        plan.scales_ptr,
        0,
        out.data_ptr(),
        data_format,
        width,
        None if lora_a is None else lora_a.data_ptr(),
        0 if lora_a is None else lora_a.shape[0],
        None if lora_b is None else lora_b.data_ptr(),
        float(scaling),
        native.threads_for(rows * plan.in_features * plan.out_features),
    )
    if status != 0:
        raise MemoryError("eetq_lora: the CPU decode kernel could not allocate its workspace")
    return out
