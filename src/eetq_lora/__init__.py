"""eetq-lora: LoRA fine-tuning of EETQ int8 weight-only quantized models, on any device.

Importing this package registers its EETQ quantizer with transformers (``enable_transformers``), so
``from_pretrained`` loads and ``save_pretrained`` writes ``quant_method: "eetq"`` checkpoints on
any device; ``disable_transformers()`` restores transformers' own (CUDA-only) quantizer. It also
hooks PEFT (``install_peft_hooks``), so stock ``peft.get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and TRL's ``SFTTrainer(peft_config=...)`` wrap EETQ layers in
EetqLoraLinear, ``target_modules="all-linear"`` included.
"""

from ._version import __version__
from .format import dequantize_weight, quantize_weight
from .integrations import disable_transformers, enable_transformers, mark_eetq_quantized, quantize_model
from .integrations.eetq_layers import is_eetq_available
from .kernels import compute_dtype, set_compute_dtype
from .lora import (
    EetqLoraLinear,
    ExportReport,
    add_adapter,
    dispatch_eetq,
    export_merged,
    get_peft_model,
    load_adapter,
    register_eetq,
)
from .lora.peft_hooks import PeftCompatibilityError, install_peft_hooks
from .parallel import local_int8_bytes, shard_model
from .quant import EetqLinear, set_checkpoint_layout

enable_transformers()
install_peft_hooks()


__all__ = [
    "__version__",
    "EetqLinear",
    "EetqLoraLinear",
    "add_adapter",
    "compute_dtype",
    "dequantize_weight",
    "disable_transformers",
    "dispatch_eetq",
    "enable_transformers",
    "export_merged",
    "ExportReport",
    "PeftCompatibilityError",
    "get_peft_model",
    "install_peft_hooks",
    "is_eetq_available",
    "load_adapter",
    "local_int8_bytes",
    "mark_eetq_quantized",
    "quantize_model",
    "quantize_weight",
    "register_eetq",
    "set_checkpoint_layout",
    "set_compute_dtype",
    "shard_model",
]
