"""EetqLoraLinear: LoRA adapters on a frozen EETQ int8 linear layer, as a PEFT LoraLayer."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch.nn.modules import module as _torch_module

from ..quant.linear import EetqLinear, autocast_enabled
from .side_path import lora_side_path

# Inits that derive A/B from (and rewrite) the float base weight; an int8 base cannot provide that.
_BASE_WEIGHT_INITS = ("pissa", "corda", "olora", "loftq", "orthogonal", "mica", "lora_ga")
_EXPORT_HINT = (
    "An int8 EETQ base cannot take the adapters' float delta in place. To get a merged model, use "
    "eetq_lora.export_merged(peft_model, out_dir): a float checkpoint of base + adapters, or an EETQ int8 "
    "one with requantize=True."
)
_SUPPORTED_INITS = 'init_lora_weights=True (Kaiming-uniform A, zero B), "gaussian", or False'

# The constructor's keyword defaults: a keyword left at its default does not conflict with config=.
_KEYWORD_DEFAULTS = {
    "lora_dropout": 0.0,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
}


def _requested_variants(config: LoraConfig) -> list[str]:
    # PEFT marks its LoRA variants in LoraConfig's field metadata (DoRA has its own message above).
    requested = []
    for field in dataclasses.fields(config):
        if field.name == "use_dora":
            continue
        if field.name == "init_lora_weights" and config.init_lora_weights in field.metadata.get("lora_variants", ()):
            requested.append(f"init_lora_weights={config.init_lora_weights!r}")
        elif field.metadata.get("is_lora_variant") and getattr(config, field.name):
            requested.append(field.name)
    return requested


def _called_plainly(*modules: torch.nn.Module) -> bool:
    """Whether calling each of these modules would run its class's forward and nothing else.

    The fused paths read a module's weights instead of calling it. That is only the same where no
    hook of the module (or a global one) would run and its forward is not replaced on the instance:
    accelerate's offloading, for one, wraps ``forward`` to load the weights first, and without it
    the call would read placeholders.
    """
    if (
        _torch_module._global_forward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_backward_pre_hooks
        or _torch_module._global_backward_hooks
    ):
        return False
    for module in modules:
        if (
            module._forward_pre_hooks
            or module._forward_hooks
            or module._backward_pre_hooks
            or module._backward_hooks
            or "forward" in module.__dict__
        ):
            return False
    return True


def _layer_label(layer: torch.nn.Module, keywords: dict[str, Any]) -> str:
    # PEFT passes the layer's path in the model as target_name, for messages like these.
    return f"{type(layer).__name__} ({keywords.get('target_name') or 'an EETQ int8 layer'})"


def _refuse_dora(label: str) -> ValueError:
    return ValueError(
        f"{label} does not support DoRA, please set use_dora=False, or keep the layers DoRA needs in float "
        "with quantize_model(model, modules_to_not_convert=[...])"
    )


def _config_from_keywords(
    config: Optional[LoraConfig], r: int, lora_alpha: int, keywords: dict[str, Any]
) -> LoraConfig:
    if config is None:
        return LoraConfig(r=r, lora_alpha=lora_alpha, **keywords)
    overridden = sorted(k for k, v in keywords.items() if v != _KEYWORD_DEFAULTS[k])
    if overridden:
        raise TypeError(
            f"EetqLoraLinear got both config= and the keyword(s) {overridden}; set them on the LoraConfig instead"
        )
    return config


class EetqLoraLinear(torch.nn.Module, LoraLayer):
    """LoRA on an EETQ int8 linear layer: ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` per active adapter.

    The base layer stays frozen int8; merging into it is refused, and so is DoRA. Accepts
    either PEFT's ``config=`` form or the keyword form (``r``, ``lora_alpha``, ``lora_dropout``,
    ``init_lora_weights``, ``use_rslora``, ``use_dora``, ``lora_bias``). The forward also takes
    PEFT's ``adapter_names`` (one adapter name per sample, ``"__base__"`` for none).
    """

    def __init__(
        self,
        base_layer: torch.nn.Module,
        adapter_name: str,
        config: Optional[LoraConfig] = None,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        if config is not None and not isinstance(config, LoraConfig):
            # The seed's parameter list starts base_layer, adapter_name, r; PEFT's signature (kept
            # here) puts config third, so a positional rank lands in config.
            raise TypeError(
                f"{type(self).__name__}'s third argument is config, a LoraConfig (as in PEFT), got "
                f"{type(config).__name__} {config!r}; pass the rank and the other settings by keyword: "
                f"{type(self).__name__}(base_layer, adapter_name, r=8, lora_alpha=16)"
            )
        if use_dora or (config is not None and config.use_dora):
            raise _refuse_dora(_layer_label(self, kwargs))
        config = _config_from_keywords(
            config,
            r,
            lora_alpha,
            {
                "lora_dropout": lora_dropout,
                "init_lora_weights": init_lora_weights,
                "use_rslora": use_rslora,
                "use_dora": use_dora,
                "lora_bias": lora_bias,
            },
        )

        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def quant_linear_module(self) -> torch.nn.Module:
        """The base layer under its older name, kept for backward compatibility.

        An attribute, not a second registered submodule: registered twice, every base tensor
        would appear twice in state dicts, which sharded checkpointing (DCP) and PEFT's base-model
        state-dict helpers reject.
        """
        return self.base_layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # State dicts written while the alias was a registered submodule (PEFT's own EETQ layer
        # does that) hold each base tensor under both names: read the alias as base_layer.
        alias, canonical = prefix + "quant_linear_module.", prefix + "base_layer."
        for key in [key for key in state_dict if key.startswith(alias)]:
            value = state_dict.pop(key)
            state_dict.setdefault(canonical + key[len(alias) :], value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        # Also reached directly by PEFT when a second adapter is added to an already wrapped layer.
        if config.use_dora:
            raise _refuse_dora(_layer_label(self, kwargs))
        init = config.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_BASE_WEIGHT_INITS):
            raise ValueError(
                f"{_layer_label(self, kwargs)}: init_lora_weights={init!r} needs to read and rewrite the float base "
                f"weight, but an EETQ base layer is frozen int8. Use {_SUPPORTED_INITS}, or keep this layer in float "
                "with quantize_model(model, modules_to_not_convert=[...])"
            )
        dropout = config.lora_dropout
        if not 0.0 <= dropout < 1.0:
            # PEFT turns any p <= 0 into no dropout at all, so a sign slip would go unnoticed.
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
        variants = _requested_variants(config)
        if variants:
            raise ValueError(
                f"{_layer_label(self, kwargs)} supports plain LoRA only, "
                f"not the LoRA variant(s) {', '.join(variants)}; leave those options unset for EETQ layers, or keep "
                "the layers they need in float with quantize_model(model, modules_to_not_convert=[...])"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _lora_delta(self, x: torch.Tensor, adapter: str, result_dtype: torch.dtype) -> torch.Tensor:
        lora_A = self.lora_A[adapter]
        lora_B = self.lora_B[adapter]
        dropout = self.lora_dropout[adapter]
        scaling = self.scaling[adapter]
        # Under autocast the adapter runs in the autocast dtype; otherwise x follows lora_A's dtype
        # and the output goes back to the base result's dtype.
        requires_conversion = not autocast_enabled(x.device.type)
        if requires_conversion and self._plain_adapter(lora_A, lora_B):
            return lora_side_path(dropout(x), lora_A.weight, lora_B.weight, scaling, result_dtype)
        if requires_conversion:
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
        output = lora_B(lora_A(dropout(x)))
        if requires_conversion:
            output = output.to(result_dtype)
        return output * scaling

    def _plain_adapter(self, lora_A: torch.nn.Module, lora_B: torch.nn.Module) -> bool:
        # The one-node side path covers bias-free nn.Linear adapters without hooks, with PEFT's input
        # cast on; anything else (lora_bias, disabled casting, no such adapter, a hook to run) takes
        # PEFT's module calls. The biases come from _parameters: this also runs on every decoding
        # call (see _decode_step).
        return (
            type(lora_A) is torch.nn.Linear
            and type(lora_B) is torch.nn.Linear
            and lora_A._parameters["bias"] is None
            and lora_B._parameters["bias"] is None
            and getattr(self, "cast_input_dtype_enabled", True)
            and _called_plainly(lora_A, lora_B)
        )

    def _decode_step(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # Token-by-token generation: the base layer runs its matmul and the one active adapter in one
        # fused call where it has one (EetqLinear.forward_with_adapter), None otherwise. Eval mode only:
        # its adapter sums may differ from torch's GEMM in the last bit, and a training forward (a
        # checkpointed one, say) must match its recomputation exactly.
        # Submodules and parameters are read from their dicts: through nn.Module.__getattr__ each is
        # a Python call, and between layers whose weights stream through the caches each Python step
        # costs microseconds (half the per-layer Python time went there).
        if self.training or self._disable_adapters:
            return None
        active = self._active_adapter
        if type(active) is not str:
            if len(active) != 1:
                return None
            active = active[0]
        modules = self._modules
        lora_A = modules["lora_A"]._modules.get(active)
        lora_B = modules["lora_B"]._modules.get(active)
        base = modules["base_layer"]
        if type(base) is not EetqLinear or not self._plain_adapter(lora_A, lora_B):
            return None
        dropout = modules["lora_dropout"]._modules[active]
        if (dropout.training and type(dropout) is not torch.nn.Identity) or not _called_plainly(base, dropout):
            return None
        weight_A, weight_B = lora_A._parameters["weight"], lora_B._parameters["weight"]
        return base.forward_with_adapter(x, weight_A, weight_B, self.scaling[active])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            # PEFT's argument check only looks at adapter_names, so a bare call skips it.
            out = self._decode_step(x)
            if out is not None:
                return out
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:
            return self._mixed_batch_lora(x, result, adapter_names)
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            result = result + self._lora_delta(x, active_adapter, result.dtype)
        return result

    def _mixed_batch_lora(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        # One base matmul for the whole batch; each adapter only sees its own samples (dim 0).
        for adapter in dict.fromkeys(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_A.keys():
                continue
            rows = torch.tensor(
                [i for i, name in enumerate(adapter_names) if name == adapter], device=result.device, dtype=torch.long
            )
            delta = self._lora_delta(x.index_select(0, rows), adapter, result.dtype)
            result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's weight delta ``lora_B @ lora_A * scaling``, shape [out, in], in the adapter's dtype."""
        weight_A = self.lora_A[adapter].weight
        weight_B = self.lora_B[adapter].weight
        dtype = weight_B.dtype
        # Half-precision matmuls are slow (and less exact) on CPU: compute in fp32, cast back.
        compute = torch.float32 if weight_B.device.type == "cpu" else dtype
        return ((weight_B.to(compute) @ weight_A.to(compute)) * self.scaling[adapter]).to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        error = AttributeError("Merging LoRA layers is not supported for Eetq layers.")
        if hasattr(error, "add_note"):  # Python 3.11+: shown under the message, which stays exact
            error.add_note(_EXPORT_HINT)
        raise error

    def unmerge(self) -> None:
        raise AttributeError("Unmerging LoRA layers is not supported for Eetq layers.")

    def __repr__(self) -> str:
        rep = super().__repr__()
        return "lora." + rep
