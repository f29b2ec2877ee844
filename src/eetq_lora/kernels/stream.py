"""The one-call streaming path: a layer's int8 matmul (and its one adapter) in a single compiled call.

Token-by-token generation runs every layer at M=1 with cold caches, where each Python-level step of
a call (a tensor attribute, a module attribute, an environment lookup) costs microseconds. A
``StreamPlan`` holds what a layer's weight contributes to the call (its ``native.StreamWeight``
plus the checks that the weight suits the kernel), built once and cached on the layer; a call
then only checks its activation (``dispatch`` decides when this path applies). The cache is keyed
by the weight and scale tensors and their data pointers (held weakly), so replacing either
(``layer.weight = ...``, ``.data = ...``, ``.to()``) rebuilds it.

The kernel is ``eetq_stream`` in float32 arithmetic from exact float32, bfloat16 or float16
activations, its result rounded once to their dtype. Training steps with few rows take it too,
for the forward and the input gradient.
"""

from __future__ import annotations

import weakref

import torch

from . import cpu_library
from .native import StreamOperands, StreamWeight, launch_stream, storage_covers

_PLAN_ATTRIBUTE = "_eetq_stream_plan"


def _streams(qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    # qweight [in, out] must be row-major (EetqLinear's storage): the forward sums over its rows.
    out_features = qweight.shape[1] if qweight.dim() == 2 else 0
    return (
        qweight.device.type == "cpu"
        and scales.device.type == "cpu"
        and qweight.dtype == torch.int8
        and qweight.dim() == 2
        and qweight.stride(1) == 1
        and qweight.stride(0) == out_features
        and scales.dtype == torch.float16
        and scales.is_contiguous()
        and tuple(scales.shape) == (out_features,)
        and storage_covers(qweight)
        and storage_covers(scales)
        and cpu_library.is_available()
    )


class StreamPlan(StreamWeight):
    """One layer's weight side of ``eetq_stream``; ``usable`` is False where its weight cannot stream.

    It holds the operands of the layer's forward and input-gradient calls, and of its forward with
    the adapter it last ran (``adapter_operands``).
    """

    __slots__ = (
        "weight",
        "scales",
        "in_features",
        "out_features",
        "usable",
        "forward_operands",
        "grad_operands",
        "adapter_key",
        "adapter_operands",
    )

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        # Held weakly: a stale plan must not keep a replaced weight alive.
        self.weight, self.scales = weakref.ref(qweight), weakref.ref(scales)
        self.in_features, self.out_features = qweight.shape if qweight.dim() == 2 else (0, 0)
        self.usable = _streams(qweight, scales)
        self.adapter_key = self.adapter_operands = None
        if self.usable:
            super().__init__(qweight, scales, scale_on_rows=False)
            # Activations and results are contiguous rows here (dispatch checks that).
            self.forward_operands = self.operands(True, self.in_features, self.out_features)
            self.grad_operands = self.operands(False, self.out_features, self.in_features)

    def matches(self, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether this plan still describes these tensors' memory: same objects, storage, shape and strides.

        Sharding engines (FSDP2, ZeRO-3) free a layer's gathered weight after its forward and gather
        it again, at another address, for the backward: a plan from the forward is stale there.
        """
        # dtype and strides too: `.data =` can swap in a tensor of another dtype or stride at the
        # same address (a uint8 view, a strided view of one buffer).
        return (
            self.usable
            and self.weight() is qweight
            and self.scales() is scales
            and qweight.data_ptr() == self.q_ptr
            and scales.data_ptr() == self.scales_ptr
            and qweight.dtype == torch.int8
            and scales.dtype == torch.float16
            and qweight.shape == (self.in_features, self.out_features)
            and qweight.stride() == (self.out_features, 1)
            and scales.shape == (self.out_features,)
            and scales.stride() == (1,)
        )

    def __reduce__(self):
        # A copied or pickled layer rebuilds its own plan: this one points at the original's memory.
        return (_no_plan, ())


def _no_plan() -> None:
    return None


def plan_for(qweight: torch.Tensor, scales: torch.Tensor) -> StreamPlan | None:
    """A fresh plan for these tensors, or None where they cannot stream."""
    plan = StreamPlan(qweight, scales)
    return plan if plan.usable else None


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


def adapter_operands(plan: StreamPlan, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> StreamOperands:
    """``plan``'s forward operands plus this adapter (float32, contiguous, its shapes checked by the
    caller); built again only when the adapter's addresses, rank or scaling change."""
    key = (lora_a.data_ptr(), lora_b.data_ptr(), lora_a.shape[0], scaling)
    if plan.adapter_key != key:
        plan.adapter_operands = plan.operands(True, plan.in_features, plan.out_features, (lora_a, lora_b, scaling))
        plan.adapter_key = key
    return plan.adapter_operands


def forward(plan: StreamPlan, x: torch.Tensor, rows: int, operands: StreamOperands | None = None) -> torch.Tensor:
    """``x @ Wt`` in ``x``'s dtype and shape, plus an adapter's output where ``operands`` come from
    ``adapter_operands``.

    ``x`` is a contiguous CPU tensor of ``rows`` rows of ``in_features`` (``dispatch`` checks that).
    """
    shape = list(x.shape)
    shape[-1] = plan.out_features
    out = torch.empty(shape, dtype=x.dtype)
    launch_stream(plan, plan.forward_operands if operands is None else operands, x, rows, out)
    return out


def grad_input(plan: StreamPlan, grad: torch.Tensor, rows: int) -> torch.Tensor:
    """``grad @ W`` in ``grad``'s dtype and shape (``rows`` contiguous rows of ``out_features``)."""
    shape = list(grad.shape)
    shape[-1] = plan.in_features
    out = torch.empty(shape, dtype=grad.dtype)
    launch_stream(plan, plan.grad_operands, grad, rows, out)
    return out
