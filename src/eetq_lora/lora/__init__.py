"""LoRA on EETQ int8 layers: the EetqLoraLinear layer, its PEFT dispatcher and the PEFT glue."""

from .dispatch import dispatch_eetq
from .export import ExportReport, export_merged
from .layer import EetqLoraLinear
from .peft_glue import add_adapter, get_peft_model, load_adapter, register_eetq

__all__ = [
    "EetqLoraLinear",
    "ExportReport",
    "export_merged",
    "add_adapter",
    "dispatch_eetq",
    "get_peft_model",
    "load_adapter",
    "register_eetq",
]
