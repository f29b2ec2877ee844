"""EETQ checkpoints in transformers on any device, through transformers' quantizer registry.

Activation: ``import eetq_lora`` calls ``enable_transformers()``, which registers
``EetqLoraHfQuantizer`` as transformers' quantizer for ``"quant_method": "eetq"`` in place of the
stock one (that one needs a CUDA GPU and downloads its kernels from the Hugging Face Hub). Calling
``enable_transformers()`` again is harmless; ``disable_transformers()`` puts the stock quantizer
back. Nothing here touches the network. From then on, in this process:

- ``from_pretrained(eetq_checkpoint)`` builds EetqLinear layers and loads the stored int8 weights
  as they are (no requantization), reading them from the sm75 layout unless the safetensors
  metadata key ``eetq_layout`` (written by this package) names another one;
- ``from_pretrained(float_checkpoint, quantization_config=EetqConfig("int8"))`` quantizes every
  eligible ``nn.Linear`` on load with this package's EETQ-exact math;
- ``save_pretrained`` writes what stock transformers + EETQ on a GPU loads: the
  ``quantization_config`` in config.json, ``weight`` int8 [in, out] in the sm75 layout (each
  layer's ``checkpoint_layout``), ``weight_scales`` float16 [out] and the bias.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
from safetensors import safe_open
from torch import nn
from transformers import EetqConfig, PreTrainedModel
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import should_convert_module

from ..format.layout import DEFAULT_LAYOUT, METADATA_KEY, check_layout, resolve_layout, unpack_weight
from ..format.quantize import FLOAT_DTYPES, quantize_weight
from ..quant.linear import EetqLinear, bias_dtype_for

QUANT_METHOD = "eetq"
logger = logging.getLogger("eetq_lora")
_stock_quantizer: type[HfQuantizer] | None = None
_default_layout = DEFAULT_LAYOUT


def enable_transformers(default_layout: str = DEFAULT_LAYOUT) -> None:
    """Make transformers load and save ``quant_method: "eetq"`` models with this package (idempotent).

    ``default_layout`` is the layout assumed for checkpoints whose safetensors metadata does not
    name one: ``"sm75"`` (EETQ on T4/A10/A100/RTX 30/40/L4), or ``"sm70"`` for a checkpoint
    quantized on a V100.
    """
    global _stock_quantizer, _default_layout
    _default_layout = check_layout(default_layout)
    current = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    if current is EetqLoraHfQuantizer:
        return
    # register_quantizer refuses a name that is taken, so the stock entry leaves the registry first.
    _stock_quantizer = AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantizer(QUANT_METHOD)(EetqLoraHfQuantizer)


def disable_transformers() -> None:
    """Give ``quant_method: "eetq"`` back to transformers' own quantizer."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not EetqLoraHfQuantizer:
        return
    del AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
    if _stock_quantizer is not None:
        register_quantizer(QUANT_METHOD)(_stock_quantizer)


def is_transformers_enabled() -> bool:
    """Whether transformers currently routes ``quant_method: "eetq"`` to this package."""
    return AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is EetqLoraHfQuantizer


def read_checkpoint_layout(checkpoint_files: Iterable[str | os.PathLike] | None, default: str = DEFAULT_LAYOUT) -> str:
    """The int8 weight layout recorded in these safetensors files' metadata, or ``default``.

    Files that are not safetensors, or that record nothing, count as ``default``; files that
    record different layouts are a ValueError.
    """
    found = {}
    for path in checkpoint_files or ():
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as handle:
            layout = (handle.metadata() or {}).get(METADATA_KEY)
        if layout is not None:
            found[str(path)] = check_layout(layout)
    layouts = set(found.values())
    if len(layouts) > 1:
        raise ValueError(f"checkpoint shards disagree on the EETQ weight layout ({METADATA_KEY} metadata): {found}")
    return layouts.pop() if layouts else check_layout(default)


def mark_eetq_quantized(model: PreTrainedModel, modules_to_not_convert: Iterable[str] = ("lm_head",)) -> None:
    """Attach EETQ's quantization config to a transformers model quantized with ``quantize_model``.

    Afterwards ``model.save_pretrained`` writes an EETQ checkpoint (config and layout metadata
    included), as it does for a model loaded through ``from_pretrained``. Pass the
    ``modules_to_not_convert`` that were given to ``quantize_model``.
    """
    if not any(isinstance(module, EetqLinear) for module in model.modules()):
        raise ValueError(
            "mark_eetq_quantized: the model has no EetqLinear layer; run eetq_lora.quantize_model(model) first"
        )
    config = EetqConfig("int8", modules_to_not_convert=list(modules_to_not_convert or ()))
    model.config.quantization_config = config
    model.hf_quantizer = EetqLoraHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


class _SharedOp(ConversionOps):
    # transformers deep-copies a converter, operations included, for every key it loads; these
    # ops only point back to their quantizer, so every copy is the op itself.
    def __init__(self, quantizer: "EetqLoraHfQuantizer") -> None:
        # Not called `hf_quantizer`: transformers would then stop casting the float tensors
        # (norms, embeddings) that pass through these converters unchanged.
        self.quantizer = quantizer

    def __deepcopy__(self, memo):
        return self

    @property
    def reverse_op(self) -> ConversionOps:
        # Saving goes through EetqLinear's state dict, which already writes the checkpoint layout.
        return _PassThrough()


class _PassThrough(ConversionOps):
    def convert(self, input_dict, **kwargs):
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return self


class _UnpackWeight(_SharedOp):
    """Turns a stored EETQ weight into the plain int8 matrix EetqLinear keeps; other weights pass."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        [(key, tensors)] = input_dict.items()
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        module_name = full_layer_name.rpartition(".")[0]
        layer = model.get_submodule(module_name) if model is not None else None
        if isinstance(layer, EetqLinear):
            self.quantizer.loaded.add(full_layer_name)
            expected = (layer.in_features, layer.out_features)
            if tensor.dtype != torch.int8 or tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{full_layer_name}: an EETQ checkpoint stores int8 [in_features, out_features] = "
                    f"{list(expected)}, got {tensor.dtype} of shape {list(tensor.shape)}; if this layer was "
                    "left in float, list it in the quantization_config's modules_to_not_convert"
                )
            layout = resolve_layout(layer.checkpoint_layout, *expected)
            tensor = unpack_weight(tensor, layout, name=module_name)
        return {key: tensor}


class _NoteScales(_SharedOp):
    """Notes which EetqLinear layers received their scales; the tensors pass unchanged."""

    def convert(self, input_dict, full_layer_name=None, **kwargs):
        self.quantizer.loaded.add(full_layer_name)
        return input_dict


class _QuantizeWeight(ConversionOps):
    """Quantizes a float nn.Linear weight on load into EetqLinear's ``weight`` and ``weight_scales``."""

    def convert(self, input_dict, **kwargs):
        result = {}
        for key, tensors in input_dict.items():
            weight = tensors[0] if isinstance(tensors, list) else tensors
            q, scales = quantize_weight(weight, name=key.removesuffix(".weight"))
            result[key] = q
            result[key + "_scales"] = scales
        return result


def _tied_head(model) -> list[str]:
    """The output head's name where the config ties it to the input embeddings, else nothing.

    transformers ties the head after loading by giving it the embedding's float weight: an int8
    layer there would end up holding a float matrix and no scales. It stays in float, as it does
    under ``eetq-lora quantize``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(
        getattr(config, "get_text_config", lambda: None)(), "tie_word_embeddings", False
    )
    if head is None or not tied:
        return []
    names = [name for name, module in model.named_modules() if module is head]
    if names:
        logger.info("eetq_lora: keeping the output head %s in float, since it is tied to the embeddings", names[0])
    return names


class EetqLoraHfQuantizer(HfQuantizer):
    """transformers quantizer for ``quant_method: "eetq"`` backed by this package's portable EetqLinear."""

    requires_calibration = False
    quantization_config: EetqConfig

    def __init__(self, quantization_config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.layout = _default_layout
        self.loaded: set[str] = set()
        self.modules_to_not_convert: list[str] = []

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if not isinstance(device_map, dict):
            return
        devices = {str(device) for device in device_map.values()}
        if "disk" in devices:
            raise ValueError(
                "EETQ int8 models cannot be offloaded to disk: give every module a device in device_map "
                "(the int8 layers run on CPU as well as on GPU)"
            )
        if "cpu" in devices and devices != {"cpu"}:
            # accelerate would keep the CPU part's weights as model.state_dict() gives them, in the
            # EETQ checkpoint layout, and put those bytes into the layers at each call.
            raise ValueError(
                "EETQ int8 models cannot be offloaded to CPU next to a GPU (device_map mixes 'cpu' with "
                f"{sorted(devices - {'cpu'})}): run the whole model on the GPU(s), or the whole model on the CPU "
                "(device_map='cpu'); the int8 weights take half the memory of bf16 ones"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def get_new_dtype(self, converter, param, dtype):
        new_dtype = super().get_new_dtype(converter, param, dtype)
        # Only EETQ weights are int8 in these models: casting a float tensor to int8 on the way in
        # would hide a checkpoint that holds float where int8 belongs, so it arrives uncast and fails.
        return None if new_dtype == torch.int8 else new_dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and isinstance(model.get_submodule(module_name), EetqLinear)

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeWeight()

    def get_weight_conversions(self):
        # Every "*.weight" and "*.weight_scales" key of a pre-quantized checkpoint passes through these;
        # only EetqLinear weights are changed.
        if not self.pre_quantized:
            return []
        return [
            WeightConverter("weight", "weight", [_UnpackWeight(self)]),
            WeightConverter("weight_scales", "weight_scales", [_NoteScales(self)]),
        ]

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs) -> None:
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
        )
        if not self.pre_quantized:
            self.modules_to_not_convert += _tied_head(model)
        self.layout = (
            read_checkpoint_layout(checkpoint_files, _default_layout) if self.pre_quantized else _default_layout
        )
        replaced = 0
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or not should_convert_module(name, self.modules_to_not_convert):
                continue
            with torch.device("meta"):
                layer = EetqLinear(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    dtype=bias_dtype_for(module),
                    checkpoint_layout=self.layout,
                )
            model.set_submodule(name, layer)
            replaced += 1
        if replaced == 0:
            raise ValueError(
                "EETQ quantization found no nn.Linear layer to convert in this model; check the "
                f"quantization_config's modules_to_not_convert ({self.modules_to_not_convert})"
            )

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            missing = [
                f"{name}.{tensor}"
                for name, module in model.named_modules()
                if isinstance(module, EetqLinear)
                for tensor in ("weight", "weight_scales")
                if f"{name}.{tensor}" not in self.loaded
            ]
            self.loaded.clear()
            if missing:
                shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                raise ValueError(
                    f"this EETQ checkpoint lacks {len(missing)} int8 tensor(s) its quantization_config calls for: "
                    f"{shown}; the checkpoint is incomplete, or modules_to_not_convert does not match how it "
                    "was quantized"
                )
        return model

    def get_state_dict_and_metadata(self, model):
        layouts = {module.checkpoint_layout for module in model.modules() if isinstance(module, EetqLinear)}
        if len(layouts) > 1:
            raise ValueError(
                f"EetqLinear layers of this model use different checkpoint layouts {sorted(layouts)}; "
                "pick one with eetq_lora.set_checkpoint_layout(model, layout) before saving"
            )
        return None, {METADATA_KEY: layouts.pop() if layouts else DEFAULT_LAYOUT}

    def dequantize(self, model, dtype=None):
        # Without a dtype, transformers takes config.dtype, which is missing or stale once the model
        # was cast (model.to(torch.bfloat16) leaves it float32): the layers come back in the dtype of
        # the model's other float parameters instead, so the model runs in one dtype.
        if dtype is None:
            floats = (
                parameter.dtype
                for module in model.modules()
                if not isinstance(module, EetqLinear)
                for parameter in module.parameters(recurse=False)
                if parameter.dtype in FLOAT_DTYPES
            )
            dtype = next(floats, None)
        return super().dequantize(model, dtype=dtype)

    def _dequantize(self, model, dtype=None):
        dtype = dtype if dtype in FLOAT_DTYPES else torch.float16
        for name, module in list(model.named_modules()):
            if not isinstance(module, EetqLinear):
                continue
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        # EetqLinear's matmul is a torch.library operator (kernels.ops): torch.compile traces the
        # model in one graph, so transformers may compile its decoding step.
        return True

    @property
    def is_trainable(self) -> bool:
        return True
