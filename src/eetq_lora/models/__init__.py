"""Model preparation: the built-in model, GGUF conversion and caching, loading and EETQ quantization."""

from ..cache import cache_dir
from .default import DEFAULT_MODEL_NAME, default_gguf_path
from .gguf import gguf_to_folder
from .load import (
    DTYPE_CHOICES,
    LoadedModel,
    ModelSource,
    check_model_spec,
    default_device,
    load_quantized,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DTYPE_CHOICES",
    "LoadedModel",
    "ModelSource",
    "cache_dir",
    "check_model_spec",
    "default_device",
    "default_gguf_path",
    "gguf_to_folder",
    "load_quantized",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model",
]
