"""Saved adapters: read their folders, agree on one base model, attach them all to one quantized base."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

RUN_CONFIG = "run_config.json"


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter folder; ``settings`` are its finetune settings when eetq-lora trained it (else None)."""

    path: Path
    label: str
    name: str
    settings: dict | None
    base_model_path: str | None


def read_adapter(path: str | Path, index: int = 0) -> AdapterInfo:
    """Check that ``path`` is a saved PEFT adapter and read what it records about its training."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"adapter folder {path} does not exist; pass the --out folder of a finetune run")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(
            f"{path} is not an adapter folder (no adapter_config.json); pass the --out folder of a finetune run"
        )
    try:
        adapter_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file} is not valid JSON ({error.msg}, line {error.lineno})") from None
    if str(adapter_config.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"{path} holds a {adapter_config.get('peft_type')} adapter; eetq-lora loads LoRA adapters only")
    settings = None
    if (folder / RUN_CONFIG).is_file():
        settings = json.loads((folder / RUN_CONFIG).read_text()).get("settings")
    # PEFT adapter names become module keys, which may not contain dots: use a plain name per position.
    return AdapterInfo(folder, str(path), f"adapter_{index}", settings, adapter_config.get("base_model_name_or_path"))


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
    from .. import load_adapter

    peft_model = model
    for adapter in adapters:
        try:
            peft_model = load_adapter(peft_model, adapter.path, adapter_name=adapter.name)
        except (ValueError, KeyError, RuntimeError) as error:
            raise UserError(f"could not load adapter {adapter.label} onto this base model: {error}") from error
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
