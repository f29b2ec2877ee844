"""EetqLinear: a frozen EETQ int8 weight-only linear layer that runs on any device."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..format.layout import DEFAULT_LAYOUT, check_layout, pack_weight, resolve_layout, unpack_weight
from ..format.quantize import FLOAT_DTYPES, dequantize_weight, quantize_weight
from ..kernels import stream
from ..kernels.dispatch import fused_adapter_forward, int8_linear
from ..kernels.ops import traced_int8_linear

# Each layer's most recent packed checkpoint weight, held weakly: (destination key, memo, tensor ref).
# PEFT registers one base layer under two names (base_layer and quant_linear_module), so a single
# state_dict() call reaches the same layer twice; the second visit reuses the first packing.
_LAST_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple[str, tuple, weakref.ref]]" = weakref.WeakKeyDictionary()


class EetqLinear(nn.Module):
    """A frozen int8 linear layer in EETQ's format.

    ``weight`` is int8 [in_features, out_features] (EETQ's orientation), ``weight_scales`` is
    float16 [out_features] (one scale per output channel) and ``bias`` is optional, in
    ``dtype``. The forward accepts float16, bfloat16 or float32 activations with any leading
    dimensions, returns the input's dtype and is differentiable in its input only.

    In memory ``weight`` is the plain row-major matrix. In the state dict it is stored in
    ``checkpoint_layout`` (``"sm75"`` by default, the layout EETQ writes on T4/A10/A100/RTX 30/40/L4
    GPUs; ``"sm70"`` for V100 checkpoints; ``"plain"`` for none) and ``load_state_dict`` reads it
    back from that layout. A layer whose sizes are not both multiples of 64 cannot be held in the
    EETQ layouts and always uses ``"plain"``, on save and on load.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
        *,
        checkpoint_layout: str = DEFAULT_LAYOUT,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"EetqLinear needs positive sizes, got in_features={in_features}, out_features={out_features}"
            )
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"EetqLinear dtype is the bias dtype and must be a float dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.zeros(in_features, out_features, dtype=torch.int8, device=device), requires_grad=False
        )
        # Scales stay float16 whatever the model is cast to (see _apply): they are the checkpoint format.
        self.register_buffer("weight_scales", torch.zeros(out_features, dtype=torch.float16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.checkpoint_layout = checkpoint_layout

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, dtype: torch.dtype = torch.float16, *, name: str | None = None
    ) -> "EetqLinear":
        """Quantize an ``nn.Linear`` (fp16, bf16 or fp32 weight) into a new EetqLinear on the same device.

        ``name`` (the layer's path in its model) labels errors and warnings.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"EetqLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError("EetqLinear.from_linear got a weight on the meta device; load the weights first")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device=weight.device, dtype=dtype
        )
        q, scales = quantize_weight(weight, name=name)
        layer.weight.data = q
        layer.weight_scales = scales
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().to(dtype).clone()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out_features, in_features]; float16 (the default) is EETQ's exact dequantization."""
        return dequantize_weight(self.weight, self.weight_scales, dtype or self.weight_scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, scales = self.weight, self.weight_scales
        if _autocast_active():
            device_type = x.device.type
            if autocast_enabled(device_type) and torch.is_floating_point(x):
                # Like nn.Linear under autocast: run in the autocast dtype, then let the kernel pick
                # its own compute dtype without autocast rewriting its matmuls.
                x = x.to(torch.get_autocast_dtype(device_type))
                linear = traced_int8_linear if torch.compiler.is_compiling() else int8_linear
                with torch.autocast(device_type, enabled=False):
                    return linear(x, weight, scales, self.bias)
        elif x.is_cpu and not torch.compiler.is_compiling():
            # The cached plan spares a CPU call the per-call checks of the weight (see kernels.stream).
            return int8_linear(x, weight, scales, self.bias, stream.layer_plan(self, weight, scales))
        if torch.compiler.is_compiling():
            return traced_int8_linear(x, weight, scales, self.bias)
        return int8_linear(x, weight, scales, self.bias)

    def forward_with_adapter(
        self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """``self(x) + (x @ lora_a.T @ lora_b.T) * scaling`` with PEFT's roundings, in one fused call, where
        one covers the case (CPU decoding: few rows, no bias, nothing needing a gradient, float32 adapter
        weights A [rank, in] and B [out, rank]); None otherwise, and the caller runs base and adapter itself."""
        # The tensors from their dicts: nn.Module.__getattr__ is a Python call each (see EetqLoraLinear._decode_step).
        parameters = self._parameters
        if parameters["bias"] is not None or not x.is_cpu or _autocast_active() or torch.compiler.is_compiling():
            return None
        plan = stream.layer_plan(self, parameters["weight"], self._buffers["weight_scales"])
        if plan is None:
            return None
        return fused_adapter_forward(plan, x, lora_a, lora_b, scaling)

    def stream_plan(self) -> "stream.StreamPlan | None":
        """This layer's cached CPU one-call plan (see ``kernels.stream``), None where its weight cannot stream."""
        return stream.layer_plan(self, self.weight, self.weight_scales)

    def _apply(self, fn, recurse=True):
        stream.forget_plan(self)
        scales = self.weight_scales
        super()._apply(fn, recurse)
        if self.weight_scales.dtype != torch.float16:
            # A model-wide dtype cast (model.to(torch.bfloat16)) must not round the scales: move them only.
            self.weight_scales = scales.to(device=self.weight_scales.device)
        return self

    @property
    def checkpoint_layout(self) -> str:
        """Layout of ``weight`` in the state dict: ``"sm75"``, ``"sm70"`` or ``"plain"``."""
        return self.__dict__.get("_checkpoint_layout", DEFAULT_LAYOUT)

    @checkpoint_layout.setter
    def checkpoint_layout(self, layout: str) -> None:
        self.__dict__["_checkpoint_layout"] = check_layout(layout)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        weight = self.weight
        if not _holds_whole_weight(weight, self.in_features, self.out_features):
            # A sharded (DTensor) or partitioned (ZeRO-3) weight is saved as it is, in the plain
            # layout: the EETQ layouts permute across rows that may live on other ranks.
            return
        layout = resolve_layout(self.checkpoint_layout, *weight.shape)
        if layout == "plain":
            return
        # Packed even with keep_vars=True: the state dict is the checkpoint format.
        destination[key] = self._packed_weight(destination, key, layout, prefix)

    def _packed_weight(self, destination, key: str, layout: str, prefix: str) -> torch.Tensor:
        weight = self.weight
        memo = (layout, weight.data_ptr(), weight._version)
        previous = _LAST_PACKED.get(self)
        if previous is not None:
            previous_key, previous_memo, previous_ref = previous
            packed = previous_ref()
            # Another alias of this layer already put its packed weight into this same state dict.
            same_call = previous_key != key and destination.get(previous_key) is packed
            if packed is not None and previous_memo == memo and same_call:
                return packed
        packed = pack_weight(weight.detach(), layout, name=prefix[:-1] or None)
        _LAST_PACKED[self] = (key, memo, weakref.ref(packed))
        return packed

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key, scales_key = prefix + "weight", prefix + "weight_scales"
        weight, scales = state_dict.get(weight_key), state_dict.get(scales_key)
        if (weight is None) != (scales is None):
            present, absent = (weight_key, scales_key) if scales is None else (scales_key, weight_key)
            error_msgs.append(
                f"{absent!r} is missing but {present!r} is present: an EETQ int8 weight and its per-channel "
                "scales only load together; save both, or leave both out with strict=False"
            )
            return
        if weight is not None:
            problems = self._checkpoint_problems(weight_key, weight, scales_key, scales)
            if problems:
                error_msgs.extend(problems)
                return
            if _holds_whole_weight(weight, self.in_features, self.out_features):
                layout = resolve_layout(self.checkpoint_layout, *weight.shape)
                # Module.load_state_dict hands modules its own shallow copy of the caller's dict,
                # so replacing the entry here leaves the caller's tensors untouched.
                state_dict[weight_key] = unpack_weight(weight, layout, name=prefix[:-1] or None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _checkpoint_problems(self, weight_key: str, weight, scales_key: str, scales) -> list[str]:
        problems = []
        expected_shape = (self.in_features, self.out_features)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or tuple(weight.shape) != expected_shape:
            message = (
                f"{weight_key!r}: expected an int8 tensor of shape [in_features, out_features] = "
                f"{list(expected_shape)} (EETQ's orientation), got {_describe(weight)}"
            )
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                message += "; a float nn.Linear weight must be quantized first (EetqLinear.from_linear, quantize_model)"
            elif isinstance(weight, torch.Tensor) and tuple(weight.shape) == expected_shape[::-1]:
                message += "; it looks transposed ([out, in] is nn.Linear's orientation)"
            problems.append(message)
        scales_ok = isinstance(scales, torch.Tensor) and scales.dtype == torch.float16
        if not scales_ok or tuple(scales.shape) != (self.out_features,):
            problems.append(
                f"{scales_key!r}: expected a float16 tensor of shape [out_features] = [{self.out_features}], "
                f"got {_describe(scales)}"
            )
        elif scales.device.type != "meta" and not bool(torch.isfinite(scales).all()):
            bad = int((~torch.isfinite(scales)).sum())
            problems.append(
                f"{scales_key!r}: {bad} of the {self.out_features} scales are inf or NaN; the checkpoint is corrupt "
                "(EETQ scales are absmax/128 of each output channel, always finite)"
            )
        return problems

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def bias_dtype_for(linear: nn.Linear) -> torch.dtype:
    """The dtype an EetqLinear made from ``linear`` keeps its bias in: the layer's own float dtype
    (a float16 bias would round, or overflow, a float32 one), float16 for any other weight."""
    return linear.weight.dtype if linear.weight.dtype in FLOAT_DTYPES else torch.float16


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device type autocast does not know
    (``meta``, for one), where ``torch.is_autocast_enabled`` raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_active() -> bool:
    # One call where torch has it: whether any device's autocast is on.
    return _any_autocast() if _any_autocast is not None else torch.is_autocast_enabled("cpu")


def _holds_whole_weight(weight: torch.Tensor, in_features: int, out_features: int) -> bool:
    """Whether ``weight`` is the layer's whole int8 matrix in local memory, the only form the EETQ
    layouts apply to; a DTensor shard, a ZeRO-3 partition or a meta tensor is kept plain."""
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.device.type != "meta"
        and tuple(weight.shape) == (in_features, out_features)
    )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {list(value.shape)}"
    return type(value).__name__


def set_checkpoint_layout(model: nn.Module, layout: str) -> int:
    """Set ``checkpoint_layout`` on every EetqLinear in ``model`` (itself included); returns how many."""
    check_layout(layout)
    layers = [module for module in model.modules() if isinstance(module, EetqLinear)]
    for layer in layers:
        layer.checkpoint_layout = layout
    return len(layers)
