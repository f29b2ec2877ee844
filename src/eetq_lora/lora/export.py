"""export_merged: write a PeftModel on an EETQ base as a plain float (or requantized EETQ) checkpoint.

This is the explicit, out-of-place counterpart of the merge() that EetqLoraLinear refuses:
the int8 base in memory is never modified.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..atomic import publish_folder
from ..format.quantize import FLOAT_DTYPES
from ..integrations.eetq_layers import eetq_layer_classes
from ..integrations.quantize_model import quantize_model
from ..quant.linear import EetqLinear
from .layer import EetqLoraLinear

logger = logging.getLogger("eetq_lora")


@dataclass
class ExportReport:
    """What export_merged wrote; with ``requantize=True`` also the error requantization added."""

    path: Path
    merged_layers: int
    requantized: bool
    # per layer: ||dequant(quant(W_merged)) - W_merged|| / ||W_merged||
    layer_errors: dict[str, float] = field(default_factory=dict)
    overall_error: float | None = None


def _active_module(module: nn.Module) -> nn.Module:
    # A PEFT modules_to_save wrapper stands for its trained copy when that adapter is active.
    if isinstance(module, ModulesToSaveWrapper):
        adapter = module.active_adapter
        if not module.disable_adapters and adapter in module.modules_to_save:
            return module.modules_to_save[adapter]
        return module.original_module
    return module


def _resolve(model: nn.Module, path: str) -> nn.Module:
    module = _active_module(model)
    for part in path.split(".") if path else []:
        module = _active_module(getattr(module, part))
    return module


def _merged_linear(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 weight [out, in] and bias of a (possibly LoRA-wrapped) EETQ layer, adapters merged."""
    if isinstance(module, EetqLoraLinear):
        base = module.get_base_layer()
        weight = _dequantized(base, name)
        bias = None if getattr(base, "bias", None) is None else base.bias.detach().float().clone()
        if not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                weight += module.get_delta_weight(adapter).float()
                if module.lora_bias[adapter]:
                    if bias is None:
                        raise ValueError(
                            f"{name}: adapter {adapter!r} has lora_bias=True but the base layer has no bias, so the "
                            "merged layer cannot be written as an nn.Linear; train without lora_bias to export"
                        )
                    bias += module.lora_B[adapter].bias.detach().float() * module.scaling[adapter]
        return weight, bias
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().float().clone()
    return _dequantized(module, name), bias


def _merged_float_layer(module: BaseTunerLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of a PEFT layer on a float base (a layer kept out of quantization), its
    active adapters merged by PEFT's own merge, on a copy: the model in memory stays as it was."""
    merged = copy.deepcopy(module)
    if not merged.disable_adapters:
        merged.merge()
    base = merged.get_base_layer()
    bias = getattr(base, "bias", None)
    return base.weight.detach().float(), None if bias is None else bias.detach().float()


def _dequantized(layer: nn.Module, name: str) -> torch.Tensor:
    if isinstance(layer, EetqLinear):
        return layer.dequantize(torch.float32)
    raise TypeError(
        f"{name}: cannot dequantize a {type(layer).__name__}; only eetq_lora.EetqLinear layers can be exported"
    )


def _float_config(config, dtype: torch.dtype):
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    return config


def export_merged(
    peft_model: PeftModel,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    requantize: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Write the base model with its active LoRA adapters merged as a Hugging Face checkpoint.

    ``requantize=False`` writes a plain float checkpoint in ``dtype`` (dequantized base +
    LoRA deltas) that stock transformers loads. ``requantize=True`` quantizes the merged
    weights back to EETQ int8 and writes an EETQ checkpoint, reporting the error that adds,
    per layer and overall. The folder appears whole or not at all; an existing ``out_dir`` is
    refused unless ``overwrite=True``, and an existing file is always refused (FileExistsError).
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"export_merged expects a peft.PeftModel, got {type(peft_model).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"export_merged writes float16, bfloat16 or float32 weights, got dtype={dtype}")
    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite)

    base = peft_model.get_base_model()
    if not hasattr(base, "config") or not hasattr(base, "save_pretrained"):
        raise TypeError("export_merged needs a transformers model under the PeftModel (it writes a HF checkpoint)")
    config = _float_config(base.config, dtype)
    with torch.device("meta"):
        float_model = type(base)(config)

    eetq_types = (EetqLoraLinear, *eetq_layer_classes())
    merged_names: list[str] = []  # the EETQ layers (requantize=True quantizes them again)
    merged_float = 0
    state: dict[str, torch.Tensor] = {}
    for name, target in float_model.named_modules():
        if not isinstance(target, nn.Linear):
            continue
        source = _resolve(base, name)
        # EetqLoraLinear is a BaseTunerLayer too: the EETQ test comes first.
        if isinstance(source, eetq_types):
            weight, bias = _merged_linear(source, name)
            merged_names.append(name)
        elif isinstance(source, BaseTunerLayer):
            weight, bias = _merged_float_layer(source)
            merged_float += 1
        else:
            continue
        state[f"{name}.weight"] = weight
        if target.bias is not None:
            if bias is None:
                raise ValueError(f"{name}: the float architecture expects a bias the quantized layer lacks")
            state[f"{name}.bias"] = bias
    for key in float_model.state_dict():
        if key not in state:
            module_path, _, attribute = key.rpartition(".")
            state[key] = getattr(_resolve(base, module_path), attribute).detach()

    float_model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    float_model.tie_weights()
    report = ExportReport(path=out_dir, merged_layers=len(merged_names) + merged_float, requantized=requantize)

    to_save: nn.Module = float_model
    if requantize:
        keep_float = [
            name for name, m in float_model.named_modules() if isinstance(m, nn.Linear) and name not in merged_names
        ]
        # quantize from the fp32 merged weights, not from their dtype-rounded copy
        float_model.load_state_dict(
            {f"{n}.weight": state[f"{n}.weight"] for n in merged_names}, strict=False, assign=True
        )
        to_save = quantize_model(float_model, modules_to_not_convert=keep_float)
        squared_error = squared_norm = 0.0
        for name in merged_names:
            exact = state[f"{name}.weight"]
            err = (to_save.get_submodule(name).dequantize(torch.float32) - exact).pow(2).sum().item()
            norm = exact.pow(2).sum().item()
            report.layer_errors[name] = (err / norm) ** 0.5 if norm else 0.0
            squared_error, squared_norm = squared_error + err, squared_norm + norm
        report.overall_error = (squared_error / squared_norm) ** 0.5 if squared_norm else 0.0
        for module in to_save.modules():
            if isinstance(module, EetqLinear) and module.bias is not None:
                module.bias.data = module.bias.data.to(torch.float16)
        logger.info("eetq_lora: requantization error (relative Frobenius) overall %.3e", report.overall_error)

    # The destination may have changed while the weights were merged: check it again just before writing.
    _check_destination(out_dir, overwrite)
    publish_folder(to_save.save_pretrained, out_dir, if_exists="replace" if overwrite else "error")
    return report


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        # overwrite=True replaces an earlier export (a folder), never a file someone put there.
        raise FileExistsError(
            f"{out_dir} is an existing file, not a folder; export_merged writes a folder: choose another path"
        )
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True")
