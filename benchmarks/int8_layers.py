"""LoRA layers on int8 and float bases, timed against each other in one process.

``eetq-base`` is the bare EetqLinear (no LoRA), to show the kernel alone. Every other
implementation is the LoRA layer PEFT (or eetq_lora) puts in a model, r=16, alpha=32, adapters
in float32 as PEFT keeps them; the layer module itself is timed, without the PeftModel wrapper.
A peer whose package is missing or fails to build is reported, not fatal.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import bench_utils
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from torch import nn

import eetq_lora
from eetq_lora.kernels import compute_dtype

RANK, ALPHA = 16, 32
# Every timed call starts with cold, clean caches, as a layer's weight in a real model would be.
_SCRUB = bench_utils.CacheScrubber()


@dataclass
class Impl:
    """One benchmarked layer: the module, its activation dtype and the compute-dtype override."""

    name: str
    module: nn.Module
    dtype: torch.dtype
    compute: torch.dtype | None = None
    base_bytes: int = 0
    notes: list[str] = field(default_factory=list)


class SingleLayer(nn.Module):
    """A module whose only layer is ``proj``: what PEFT wraps when a benchmark times one layer."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)


def _peft_layer(base: nn.Module, use_eetq: bool = False) -> nn.Module:
    holder = SingleLayer(base)
    model = eetq_lora.get_peft_model(holder, lora_config()) if use_eetq else peft_get_peft_model(holder, lora_config())
    return model.base_model.model.proj


def _eetq(linear: nn.Linear) -> nn.Module:
    return _peft_layer(eetq_lora.EetqLinear.from_linear(linear), use_eetq=True)


def _torchao(linear: nn.Linear) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = SingleLayer(copy.deepcopy(linear).bfloat16())
    quantize_(holder, Int8WeightOnlyConfig())
    return _peft_layer(holder.proj)


def _quanto(linear: nn.Linear) -> nn.Module:
    from optimum.quanto import freeze, qint8, quantize

    holder = SingleLayer(copy.deepcopy(linear).bfloat16())
    quantize(holder, weights=qint8)
    freeze(holder)
    return _peft_layer(holder.proj)


def _bitsandbytes(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(
        linear.weight.detach().bfloat16().clone(), requires_grad=False, has_fp16_weights=False
    )
    return _peft_layer(layer.to("cpu"))


# name -> (builder, activation dtype, compute dtype override)
BUILDERS: dict[str, tuple[Callable[[nn.Linear], nn.Module], torch.dtype, torch.dtype | None]] = {
    "eetq-base": (eetq_lora.EetqLinear.from_linear, torch.bfloat16, None),
    "eetq-bf16": (_eetq, torch.bfloat16, None),
    "eetq-fp32": (_eetq, torch.float32, None),
    "eetq-fp32/bf16c": (_eetq, torch.float32, torch.bfloat16),
    "peft-fp32": (lambda linear: _peft_layer(copy.deepcopy(linear)), torch.float32, None),
    "peft-bf16": (lambda linear: _peft_layer(copy.deepcopy(linear).bfloat16()), torch.bfloat16, None),
    "torchao-int8wo": (_torchao, torch.bfloat16, None),
    "quanto-qint8": (_quanto, torch.bfloat16, None),
    "bnb-int8": (_bitsandbytes, torch.bfloat16, None),
}
# (ours, peer): the ratios the report prints.
COMPARISONS = [
    ("eetq-bf16", "peft-bf16"),
    ("eetq-bf16", "torchao-int8wo"),
    ("eetq-bf16", "quanto-qint8"),
    ("eetq-bf16", "bnb-int8"),
    ("eetq-fp32", "peft-fp32"),
    ("eetq-fp32/bf16c", "peft-fp32"),
]


def float_linear(in_features: int, out_features: int) -> nn.Linear:
    """The float layer every implementation starts from (the same weights for the same shape)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(linear.weight, std=in_features**-0.5)
    return linear


def build_impls(in_features: int, out_features: int, names: list[str]) -> tuple[dict[str, Impl], dict[str, str]]:
    """Every requested implementation of an in x out LoRA layer over the same float weight.

    Returns the built ones and, for the rest, why they could not be built.
    """
    linear = float_linear(in_features, out_features)
    built: dict[str, Impl] = {}
    failed: dict[str, str] = {}
    for name in names:
        builder, dtype, compute = BUILDERS[name]
        try:
            # Every implementation gets its own weight, even variants of one layer: a weight shared
            # by neighbours in the rounds would still be in the cache for the second one.
            module = builder(linear)
        except Exception as error:  # noqa: BLE001 - a peer that does not build is reported, not fatal
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            continue
        built[name] = Impl(name, module, dtype, compute, bench_utils.module_bytes(module))
    return built, failed


def _call(impl: Impl, x: torch.Tensor, grad: torch.Tensor | None) -> Callable[[], object]:
    # The module's mode is set here, once per cell, not in the timed call: switching it walks the
    # module tree, which is the harness's cost, not the layer's.
    impl.module.train(grad is not None)
    override = functools.partial(compute_dtype, impl.compute) if impl.compute is not None else contextlib.nullcontext

    def forward() -> None:
        with torch.no_grad(), override():
            impl.module(x)

    def forward_backward() -> None:
        x.grad = None
        with override():
            out = impl.module(x)
        out.backward(grad)

    return forward if grad is None else forward_backward


def relative_errors(impls: dict[str, Impl], in_features: int, rows: int = 8) -> dict[str, float]:
    """Each implementation's forward against the float64 product with the original float weight."""
    linear = float_linear(in_features, next(iter(impls.values())).module.out_features)
    x = torch.randn(rows, in_features)
    expected = x.double() @ linear.weight.detach().double().t()
    errors = {}
    for name, impl in impls.items():
        impl.module.eval()
        with torch.no_grad(), compute_dtype(impl.compute):
            out = impl.module(x.to(impl.dtype)).double()
        errors[name] = ((out - expected).abs().max() / expected.abs().max()).item()
    return errors


def time_cell(
    impls: dict[str, Impl],
    rows: int,
    backward: bool,
    rounds: tuple[int, int],
    budget_s: float,
    extra: dict[str, Callable[[], object]] | None = None,
) -> dict[str, dict[str, float]]:
    """Median ms (and peak extra MiB of one call) of every implementation at this M, interleaved.

    ``extra`` calls (a reference operation, say) are timed in the same rounds, after the same scrub.
    """
    sample = next(iter(impls.values())).module
    in_features, out_features = sample.in_features, sample.out_features
    torch.manual_seed(1)
    calls: dict[str, Callable[[], object]] = {}
    for name, impl in impls.items():
        x = torch.randn(rows, in_features).to(impl.dtype).requires_grad_(backward)
        grad = torch.randn(rows, out_features).to(impl.dtype) if backward else None
        calls[name] = _call(impl, x, grad)
    peaks = {name: bench_utils.peak_extra_bytes(fn) / bench_utils.MiB for name, fn in calls.items()}
    calls.update(extra or {})
    medians = bench_utils.interleaved_medians(
        calls, min_rounds=rounds[0], max_rounds=rounds[1], budget_s=budget_s, before_each=_SCRUB
    )
    return {name: {"ms": seconds * 1e3, "peak_mib": peaks.get(name, math.nan)} for name, seconds in medians.items()}
