"""Stock PEFT entry points take EETQ models: two hooks installed when ``eetq_lora`` is imported.

PEFT builds every LoRA layer in ``LoraModel._create_new_module``, which asks a fixed list of
dispatcher functions, looked up by name in ``peft.tuners.lora.model``, one of which is
``dispatch_eetq``; and it expands ``target_modules="all-linear"`` in
``peft.tuners.tuners_utils._maybe_include_all_linear_layers``, which only counts ``nn.Linear`` and
``Conv1D``. Every entry point (``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM``, ``add_adapter``/``load_adapter``, ``inject_adapter_in_model``,
transformers' ``load_adapter`` and TRL's ``SFTTrainer(peft_config=...)``) goes through both, so
replacing those two names is the smallest change that reaches them all:

- ``dispatch_eetq`` becomes this package's, which wraps this package's EetqLinear as well as
  ``eetq.EetqLinear`` and transformers' EetqLinear in EetqLoraLinear;
- "all-linear" also counts EETQ layers, with PEFT's own exclusions (the output head, layers
  inside existing adapters); and ``modules_to_save`` naming an EETQ layer is refused with a
  message that says what to do, before PEFT changes the model.

Both names are checked when installing, and a LoRA layer is built on a small EETQ layer through
PEFT's own ``_create_new_module``: if a PEFT release moved either, importing ``eetq_lora`` fails
with a PeftCompatibilityError instead of letting EETQ layers go unwrapped.
"""

from __future__ import annotations

from typing import Any

import torch

from ..integrations.eetq_layers import eetq_layer_classes
from .dispatch import dispatch_eetq

_DISPATCH_MODULE = "peft.tuners.lora.model"
_ALL_LINEAR_MODULE = "peft.tuners.tuners_utils"
_ALL_LINEAR_FUNCTION = "_maybe_include_all_linear_layers"
_MARK = "_eetq_lora_hook"


class PeftCompatibilityError(ImportError):
    """The installed PEFT does not offer the places eetq_lora hooks into."""


def _module(name: str):
    import importlib

    return importlib.import_module(name)


def _incompatible(what: str) -> PeftCompatibilityError:
    import peft

    return PeftCompatibilityError(
        f"eetq_lora cannot hook into peft {peft.__version__}: {what}. This eetq_lora release supports "
        "peft>=0.21,<0.22; install one of those (pip install 'peft>=0.21,<0.22')"
    )


def _eetq_linear_names(model: torch.nn.Module) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    classes = eetq_layer_classes()
    names = {name for name, module in model.named_modules() if isinstance(module, classes)}
    # EETQ layers already wrapped by an adapter count under the wrapper's name, as PEFT counts
    # its own LoRA layers; base_layer and anything else inside a tuner layer is not a target.
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            if isinstance(module.get_base_layer(), classes):
                names.add(prefix)
            names -= {f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        names -= {name for name, module in model.named_modules() if module is head}
    return names


def _refuse_eetq_modules_to_save(peft_config: Any, model: torch.nn.Module) -> None:
    # PEFT trains a float copy of each modules_to_save module; an int8 layer cannot require
    # gradients, which PEFT would only report as a bare torch error.
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = getattr(peft_config, "modules_to_save", None) or ()
    if not names:
        return
    classes = eetq_layer_classes()
    for module_name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, classes):
            continue
        for wanted in names:
            if module_name == wanted or module_name.endswith("." + wanted):
                raise ValueError(
                    f"modules_to_save names {wanted!r}, which reaches the EETQ int8 layer {module_name!r}: PEFT "
                    "trains a full copy of such modules, and an int8 weight cannot be trained. Put the layer in "
                    "target_modules "
                    "to train LoRA on it, or keep it in float with quantize_model(model, modules_to_not_convert=[...])"
                )


def _with_eetq_all_linear(original):
    def maybe_include_all_linear_layers(peft_config: Any, model: torch.nn.Module) -> Any:
        _refuse_eetq_modules_to_save(peft_config, model)
        target = getattr(peft_config, "target_modules", None)
        is_all_linear = isinstance(target, str) and target.lower() == "all-linear"
        eetq_names = _eetq_linear_names(model) if is_all_linear else set()
        peft_config = original(peft_config, model)
        if eetq_names:
            peft_config.target_modules = set(peft_config.target_modules) | eetq_names
        return peft_config

    setattr(maybe_include_all_linear_layers, _MARK, original)
    maybe_include_all_linear_layers.__doc__ = (
        "PEFT's all-linear expansion, plus EETQ int8 layers (eetq_lora hook; the original is in "
        f"this function's {_MARK} attribute)."
    )
    return maybe_include_all_linear_layers


def install_peft_hooks() -> None:
    """Route PEFT's LoRA layer creation and "all-linear" to EETQ-aware versions (idempotent).

    Raises PeftCompatibilityError where the installed PEFT no longer has the hooked names or the
    hook does not produce an EetqLoraLinear.
    """
    dispatch_module = _module(_DISPATCH_MODULE)
    all_linear_module = _module(_ALL_LINEAR_MODULE)
    if not callable(getattr(dispatch_module, "dispatch_eetq", None)):
        raise _incompatible(f"{_DISPATCH_MODULE}.dispatch_eetq is gone")
    current = getattr(all_linear_module, _ALL_LINEAR_FUNCTION, None)
    if not callable(current):
        raise _incompatible(f"{_ALL_LINEAR_MODULE}.{_ALL_LINEAR_FUNCTION} is gone")
    # The hook works by replacing the module's global, so the caller must look it up there.
    inject = getattr(getattr(all_linear_module, "BaseTuner", None), "inject_adapter", None)
    if _ALL_LINEAR_FUNCTION not in getattr(getattr(inject, "__code__", None), "co_names", ()):
        raise _incompatible(f"{_ALL_LINEAR_MODULE}.BaseTuner.inject_adapter no longer calls {_ALL_LINEAR_FUNCTION}")
    dispatch_module.dispatch_eetq = dispatch_eetq
    if not hasattr(current, _MARK):
        setattr(all_linear_module, _ALL_LINEAR_FUNCTION, _with_eetq_all_linear(current))
    _check_hooks_work()


def _check_hooks_work() -> None:
    # PEFT's own layer factory on a tiny EETQ layer must give an EetqLoraLinear.
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    from ..quant.linear import EetqLinear
    from .layer import EetqLoraLinear

    create = getattr(LoraModel, "_create_new_module", None)
    if create is None:
        raise _incompatible("LoraModel._create_new_module is gone")
    probe = EetqLinear(8, 8, bias=False, device="meta")
    try:
        layer = create(LoraConfig(r=1), "probe", probe, r=1, lora_alpha=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the hook is broken
        raise _incompatible(
            f"building a LoRA layer on an EETQ layer failed ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(layer, EetqLoraLinear):
        raise _incompatible(f"PEFT built a {type(layer).__name__} on an EETQ layer instead of EetqLoraLinear")
