"""Find the model a user named (or the built-in one), load it in float32, quantize it to EETQ int8."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import ConfigError, ModelError
from ..quant.linear import EetqLinear
from ..quant.model import tensor_bytes
from .default import DEFAULT_MODEL_NAME, default_gguf_path
from .gguf import gguf_to_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass(frozen=True)
class ModelSource:
    """A loadable model folder; ``spec`` is what the user passed (None for the built-in model)."""

    folder: Path
    name: str
    spec: str | None


@dataclass
class LoadedModel:
    """A quantized base model with its tokenizer and the memory it takes."""

    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    dtype: torch.dtype
    float32_bytes: int
    quantized_bytes: int
    parameters: int


def check_model_spec(spec: str | None) -> None:
    """Fail fast, before anything slow, if ``spec`` names no existing .gguf file or model folder."""
    if spec is None:
        default_gguf_path()
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(
            f"model path {spec} does not exist; pass a Hugging Face model folder or a .gguf file to --model, "
            f"or leave --model out for the built-in {DEFAULT_MODEL_NAME}"
        )
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelError(
            f"model file {spec} is not a .gguf file; "
            "pass a .gguf file or a Hugging Face model folder (with config.json)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(
            f"model folder {spec} has no config.json; pass a folder saved with save_pretrained(), or a .gguf file"
        )


def resolve_model(spec: str | None, quiet: bool = False) -> ModelSource:
    """The folder to load for ``spec``: the built-in model or a .gguf file are converted once and cached."""
    check_model_spec(spec)
    if spec is None:
        return ModelSource(gguf_to_folder(default_gguf_path(), quiet=quiet), f"{DEFAULT_MODEL_NAME} (built-in)", None)
    path = Path(spec).expanduser().resolve()
    if path.is_file():
        return ModelSource(gguf_to_folder(path, quiet=quiet), str(spec), str(path))
    return ModelSource(path, str(spec), str(path))


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); private torch probes, so guarded."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:
            pass
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 where the hardware computes it natively (about 2x faster on such CPUs), else float32."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bfloat16() else torch.float32


def float32_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers would take in float32, whatever they are now.

    EETQ scales are not counted (a float model has none), so an already-quantized checkpoint
    reports the same float32 size as the float model it came from.
    """
    seen, total = set(), 0
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if id(tensor) in seen or name.endswith("weight_scales"):
            continue
        seen.add(id(tensor))
        total += tensor.numel() * 4
    return total


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_quantized(source: ModelSource, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load ``source`` in float32, quantize its linear layers to EETQ int8, then cast the rest to ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..integrations.quantize_model import quantize_model

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a cached local load takes a second; its bars would only be noise
    try:
        tokenizer = load_tokenizer(source.folder)
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32)
    # RuntimeError: a tensor whose shape does not match the config (transformers' size check).
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        text = text if len(text) <= 300 else text[:297] + "..."
        raise ModelError(
            f"could not load the model in {source.folder}: {text}; "
            "copy the folder again or re-save it with save_pretrained()"
        ) from error
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    parameters = sum(p.numel() for p in model.parameters())
    float32_size = float32_bytes(model)
    if not any(isinstance(module, EetqLinear) for module in model.modules()):
        # An EETQ checkpoint (eetq-lora quantize) arrives quantized, with the layers it kept in float:
        # quantizing again would convert those too.
        try:
            quantize_model(model)
        except ValueError as error:  # a weight with inf or NaN values, named by the message
            raise ModelError(f"cannot quantize the model in {source.folder}: {error}") from error
    model.to(device=device, dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, source, dtype, float32_size, tensor_bytes(model), parameters)


def default_device(name: str = "auto") -> torch.device:
    """``auto`` picks the GPU of this process (LOCAL_RANK under torchrun) when CUDA is available, else the CPU.

    Any other name must be a device this process can use (``cpu``, ``cuda``, ``cuda:N``, ...); a
    ConfigError names the problem and lists the devices there are.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return _checked_device(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), name)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{name!r} is not a device name; use one of: {', '.join(available_devices())}") from None
    return _checked_device(device, name)


def available_devices() -> list[str]:
    """The device names this process can compute on: ``cpu``, then each visible GPU (or other accelerator)."""
    names = ["cpu"]
    for backend in _ACCELERATORS:
        names += [f"{backend}:{index}" for index in range(_device_count(backend))]
    return names


# torch modules whose devices are usable for inference and training, each with is_available() and device_count().
_ACCELERATORS = ("cuda", "xpu", "mps")


def _device_count(backend: str) -> int:
    module = getattr(torch, backend, None)
    try:
        if module is None or not module.is_available():
            return 0
        return int(module.device_count()) if hasattr(module, "device_count") else 1
    except Exception:  # noqa: BLE001 - a backend probe that fails means the backend is unusable here
        return 0


def _checked_device(device: torch.device, name: str) -> torch.device:
    if device.type == "cpu":
        return device
    count = _device_count(device.type) if device.type in _ACCELERATORS else 0
    if count and (device.index is None or device.index < count):
        return device
    if device.type == "cuda" and not count and torch.version.cuda is None and torch.version.hip is None:
        why = "this PyTorch build has no CUDA support"
    elif device.type == "cuda" and not count:
        why = "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
    elif device.type in _ACCELERATORS:
        why = f"this process sees {count} {device.type} device(s)"
    else:
        why = "eetq-lora runs on cpu, cuda, xpu or mps devices"
    raise ConfigError(f"device {name!r} is not available: {why}; use one of: {', '.join(available_devices())}")
