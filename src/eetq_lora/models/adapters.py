"""Saved adapters: read their folders, agree on one base model, attach them all to one quantized base."""

from __future__ import annotations

import json
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

# The settings a finetune run records next to the adapter it trained (eetq_lora.training.run_folder).
RUN_CONFIG = "run_config.json"
ADAPTER_CONFIG = "adapter_config.json"
# The weight files PEFT's save_pretrained writes (and loads, safetensors first).
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter folder; ``settings`` are its finetune settings when eetq-lora trained it (else None)."""

    path: Path
    label: str
    name: str
    settings: dict | None
    base_model_path: str | None


def read_adapter(path: str | Path, index: int = 0) -> AdapterInfo:
    """Check that ``path`` is a complete saved PEFT LoRA adapter and read what it records about its training.

    Raises UserError for a missing or incomplete folder, a config that is not JSON, or weights that
    are unreadable (truncated, corrupt, or a pickle that holds more than tensors).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"adapter folder {path} does not exist; pass the --out folder of a finetune run")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise UserError(
            f"{path} is not an adapter folder (no {ADAPTER_CONFIG}); pass the --out folder of a finetune run"
        )
    adapter_config = _read_json_object(config_file, "copy the adapter folder again")
    if str(adapter_config.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"{path} holds a {adapter_config.get('peft_type')} adapter; eetq-lora loads LoRA adapters only")
    check_adapter_weights(folder)
    settings = None
    if (folder / RUN_CONFIG).is_file():
        fix = "restore it from the finetune run, or delete it to use the adapter without its recorded settings"
        settings = _read_json_object(folder / RUN_CONFIG, fix).get("settings")
        if settings is not None and not isinstance(settings, dict):
            raise UserError(f"{folder / RUN_CONFIG} has settings that are not a JSON object; {fix}")
    # PEFT adapter names become module keys, which may not contain dots: use a plain name per position.
    return AdapterInfo(folder, str(path), f"adapter_{index}", settings, adapter_config.get("base_model_name_or_path"))


def check_adapter_weights(folder: Path) -> None:
    """Raise UserError unless ``folder`` holds adapter weights that load without running code."""
    safetensors_file, pickle_file = folder / SAFETENSORS_WEIGHTS, folder / PICKLE_WEIGHTS
    if safetensors_file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(safetensors_file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UserError(
                f"{safetensors_file} is not a readable safetensors file ({_one_line(error)}): it is truncated or "
                "corrupt; copy the adapter folder again"
            ) from None
    elif pickle_file.is_file():
        import torch

        try:
            torch.load(pickle_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise refused_pickle(pickle_file, error) from None
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise UserError(
                f"{pickle_file} is not a readable PyTorch file ({type(error).__name__}): it is truncated or "
                "corrupt; copy the adapter folder again"
            ) from None
    else:
        raise UserError(
            f"{folder} has {ADAPTER_CONFIG} but no adapter weights ({SAFETENSORS_WEIGHTS}): the folder is incomplete; "
            "copy the whole finetune --out folder again"
        )


def refused_pickle(file: Path, error: pickle.UnpicklingError) -> UserError:
    """The one-line error for a pickle that ``torch.load(weights_only=True)`` refused or could not read."""
    # torch's own message suggests weights_only=False, which would run the file's code: never pass it on.
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused is None:
        return UserError(
            f"{file} is a pickle that cannot be read as plain tensors (truncated or corrupt); "
            "eetq-lora loads only safetensors files and tensor-only pickles: copy the adapter folder again"
        )
    return UserError(
        f"{file} is a pickle that holds more than tensors ({refused.group(1)}), which could run code, so it was "
        "not loaded; eetq-lora loads only safetensors files and tensor-only pickles: save the adapter as "
        f"{SAFETENSORS_WEIGHTS} with save_pretrained() where you trust the file"
    )


def _read_json_object(path: Path, fix: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; {fix}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} should hold a JSON object, not a {type(value).__name__}; {fix}")
    return value


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def base_model_spec(adapters: list[AdapterInfo], explicit: str | None) -> str | None:
    """The base model to load: ``explicit`` (--model) if given, else the one the adapters were trained on.

    Adapters trained by eetq-lora record their --model (None: the built-in model); for other
    adapters a local ``base_model_name_or_path`` folder is used. Disagreeing adapters are refused.
    """
    if explicit is not None:
        return explicit
    specs = {}
    for adapter in adapters:
        if adapter.settings is not None:
            specs[adapter.label] = adapter.settings.get("model")
        elif adapter.base_model_path and Path(adapter.base_model_path).exists():
            specs[adapter.label] = str(Path(adapter.base_model_path).resolve())
    distinct = set(specs.values())
    if len(distinct) > 1:
        listing = "; ".join(f"{label}: {spec or 'built-in'}" for label, spec in specs.items())
        raise UserError(
            f"the adapters were trained on different base models ({listing}); "
            "compare adapters of one base model, or pass --model"
        )
    return distinct.pop() if distinct else None


def setting(adapters: list[AdapterInfo], name: str, default):
    """A finetune setting recorded by the first adapter that has one, else ``default``."""
    for adapter in adapters:
        if adapter.settings is not None and adapter.settings.get(name) is not None:
            return adapter.settings[name]
    return default


def attach_adapters(model, adapters: list[AdapterInfo]):
    """Load every adapter onto ``model`` (a quantized base) with eetq_lora.load_adapter; returns the PeftModel."""
    from ..lora.peft_glue import load_adapter

    peft_model = model
    for adapter in adapters:
        try:
            peft_model = load_adapter(peft_model, adapter.path, adapter_name=adapter.name)
        except pickle.UnpicklingError as error:
            raise refused_pickle(adapter.path / PICKLE_WEIGHTS, error) from None
        except (ValueError, KeyError, RuntimeError, TypeError) as error:
            raise UserError(
                f"could not load adapter {adapter.label} onto this base model: {_one_line(error)}"
            ) from error
    peft_model.eval()
    return peft_model


@contextmanager
def using(model, adapter: AdapterInfo | None):
    """Run the block with only ``adapter`` active, or with no adapter (the quantized base) for None."""
    if adapter is None:
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model
        return
    model.set_adapter(adapter.name)
    yield model


@dataclass
class InferenceModel:
    """A quantized base with any number of adapters attached, ready to compare."""

    loaded: object  # LoadedModel
    model: object  # the PeftModel, or the bare quantized model when there are no adapters
    adapters: list[AdapterInfo]


def load_for_inference(
    adapter_paths: list[str],
    model_spec: str | None,
    dtype_name: str | None,
    device_name: str | None,
    threads: int | None,
) -> InferenceModel:
    """Read the adapters, pick their base model and dtype, load and quantize it once, attach every adapter."""
    import torch

    from .load import check_model_spec, default_device, load_quantized, resolve_dtype, resolve_model

    adapters = [read_adapter(path, index) for index, path in enumerate(adapter_paths)]
    spec = base_model_spec(adapters, model_spec)
    check_model_spec(spec)
    if threads:
        torch.set_num_threads(threads)
    device = default_device(device_name or "auto")
    dtype = resolve_dtype(dtype_name or setting(adapters, "dtype", "auto"), device)
    loaded = load_quantized(resolve_model(spec), dtype, device)
    model = attach_adapters(loaded.model, adapters) if adapters else loaded.model
    return InferenceModel(loaded, model, adapters)
