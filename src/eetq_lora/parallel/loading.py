"""Load an EETQ checkpoint straight into an FSDP2-sharded model: no rank ever holds the whole model.

The model is built on the meta device from the folder's config.json, its linear layers become
EetqLinear by the same rules ``from_pretrained`` uses, LoRA adapters are attached if asked, the
model is sharded, given storage with ``to_empty`` and filled one checkpoint tensor at a time,
each rank writing only its own shard. The result computes bit for bit what a one-process
``AutoModelForCausalLM.from_pretrained(folder)`` computes.

How the tensors travel: every rank reads the safetensors files itself rather than rank 0 reading
and broadcasting. That needs no collectives and no staging copy on rank 0, and a float tensor's
local rows come straight out of the file (safetensors reads slices). An EETQ int8 weight is the
exception: its sm75/sm70 bytes interleave rows across 16-row blocks and column pairs, so a rank's
rows only exist once the whole tensor is unpacked. That one tensor (packed and unpacked) is the
most a rank holds at once besides its own shards. The folder must be readable by every rank
(a shared file system, or a copy at the same path on every node).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ConfigError, ModelError
from ..format.layout import resolve_layout, unpack_weight
from ..integrations.hf_quantizer import QUANT_METHOD, EetqLoraHfQuantizer
from ..quant.linear import EetqLinear
from .fsdp import _fully_shard_units, check_shardable, unwrap_model

logger = logging.getLogger("eetq_lora")

_WEIGHTS_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# safetensors header dtype names -> torch dtypes (the ones a transformers checkpoint can hold).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# LoRA options that copy or add whole base modules: their copies would need checkpoint values of their own.
_UNSUPPORTED_LORA_OPTIONS = ("modules_to_save", "trainable_token_indices")

Slots = list[tuple[nn.Module, str]]


@dataclass(frozen=True)
class _Stored:
    """Where one checkpoint tensor lives and what its header says."""

    file: Path
    dtype: torch.dtype | None
    shape: tuple[int, ...]


@dataclass
class _Load:
    """One model tensor to fill from one checkpoint key; ``slots`` are all (module, name) places it is registered."""

    key: str
    slots: Slots
    eetq_weight: bool = False


@dataclass
class _Plan:
    loads: list[_Load] = field(default_factory=list)
    unused_keys: list[str] = field(default_factory=list)


def load_sharded(
    folder: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str | None = None,
    lora_config: Any = None,
    adapter_name: str = "default",
    seed: int = 0,
    shard: Callable[..., nn.Module] | None = None,
    **shard_options: Any,
) -> nn.Module:
    """Load the EETQ checkpoint in ``folder`` into an FSDP2-sharded model; each rank holds 1/N of it.

    Call it on every rank after ``torch.distributed.init_process_group()``. ``dtype`` is the float
    dtype of the non-quantized tensors, as in ``from_pretrained``: ``"auto"`` takes config.json's.
    ``device`` is where the shards live (default: the device of the sharding mesh, i.e. the current
    accelerator or the CPU). With ``lora_config`` (a peft ``LoraConfig``) the result is a
    ``PeftModel`` whose adapters start exactly as ``eetq_lora.get_peft_model`` would start them in
    one process after ``torch.manual_seed(seed)``, the same on every rank. ``shard(model,
    **shard_options)`` applies ``fully_shard`` (default: each decoder layer, the embeddings and
    an untied head, then the root; ``shard_options`` are ``fully_shard``'s ``mesh``,
    ``reshard_after_forward``, ``mp_policy``, ``offload_policy``). The model comes back in eval mode.

    A folder that is not a complete EETQ checkpoint for its config (no config.json, another
    quant_method, missing tensors, wrong shapes or dtypes) raises a ModelError before anything is
    sharded or allocated.
    """
    _check_lora_config(lora_config)
    folder = Path(folder).expanduser()
    config, quantization_config = _read_config(folder)
    files = _checkpoint_files(folder)
    stored = _read_headers(files)
    model = _build_meta_model(config, quantization_config, _resolve_dtype(dtype, config, stored), files)
    plan = _plan(model, stored)
    if plan.unused_keys:
        logger.warning(
            "eetq_lora: %d checkpoint tensor(s) match nothing in the model and were not loaded: %s",
            len(plan.unused_keys),
            _shorten(plan.unused_keys),
        )
    check_shardable(model, allow_meta=True)

    initial: dict[tuple[nn.Module, str], torch.Tensor] = {}
    if lora_config is not None:
        model, initial = _attach_lora(model, lora_config, adapter_name, seed)
    model = (shard or _fully_shard_units)(model, **shard_options)
    model.to_empty(device=device if device is not None else _mesh_device(model))
    with torch.no_grad():
        written = _recompute_non_persistent_buffers(unwrap_model(model), skip={module for module, _ in initial})
        for (module, name), value in initial.items():
            target = getattr(module, name)
            index = _local_index(target)
            _write_local(target, value[index] if index is not None else value)
            written.add((module, name))
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for load in plan.loads:
                _load_one(load, stored[load.key], handles, stack)
                written.update(load.slots)
    _check_all_written(model, written)
    return model


def _check_lora_config(lora_config: Any) -> None:
    if lora_config is None:
        return
    for option in _UNSUPPORTED_LORA_OPTIONS:
        if getattr(lora_config, option, None):
            raise ConfigError(
                f"load_sharded cannot attach LoRA with {option}={getattr(lora_config, option)!r}: it copies base "
                f"modules that the checkpoint does not hold; leave {option} unset"
            )


def _read_config(folder: Path) -> tuple[Any, dict]:
    from transformers import AutoConfig

    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder; pass the folder an EETQ model was saved to with save_pretrained()")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; pass a folder saved with save_pretrained()")
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot read {folder / 'config.json'} as a transformers config: {error}") from error
    quantization_config = getattr(config, "quantization_config", None)
    if hasattr(quantization_config, "to_dict"):
        quantization_config = quantization_config.to_dict()
    method = (quantization_config or {}).get("quant_method")
    if method != QUANT_METHOD:
        found = f'quant_method "{method}"' if method else "no quantization_config"
        raise ModelError(
            f'{folder} is not an EETQ checkpoint (config.json has {found}, not "quant_method": "{QUANT_METHOD}"); '
            "quantize it with eetq_lora.quantize_model and save it with save_pretrained() first"
        )
    return config, quantization_config


def _checkpoint_files(folder: Path) -> list[Path]:
    index_path = folder / _INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{index_path} is not a safetensors index (no weight_map): {error}") from error
        names = sorted(set(weight_map.values()))
        for name in names:
            # The index only names files of this folder; anything else is a broken or hostile index.
            if Path(name).name != name or not (folder / name).is_file():
                raise ModelError(f"{index_path} names the weight file {name!r}, which is not a file in {folder}")
        return [folder / name for name in names]
    if (folder / _WEIGHTS_FILE).is_file():
        return [folder / _WEIGHTS_FILE]
    other = sorted(path.name for path in folder.glob("*.bin"))
    hint = f" (found {', '.join(other)}: re-save with save_pretrained(safe_serialization=True))" if other else ""
    raise ModelError(f"{folder} holds no {_WEIGHTS_FILE} or {_INDEX_FILE}; load_sharded reads safetensors only{hint}")


def _read_headers(files: list[Path]) -> dict[str, _Stored]:
    stored: dict[str, _Stored] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                stored[key] = _Stored(path, _SAFETENSORS_DTYPES.get(view.get_dtype()), tuple(view.get_shape()))
    return stored


def _resolve_dtype(dtype: torch.dtype | str, config: Any, stored: dict[str, _Stored]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, str(dtype), None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype; pass e.g. torch.bfloat16, 'bfloat16' or 'auto'")
        return resolved
    # "auto" as from_pretrained reads it: config.json's dtype, else the checkpoint's first float tensor.
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    for entry in stored.values():
        if entry.dtype is not None and entry.dtype.is_floating_point:
            return entry.dtype
    return torch.get_default_dtype()


def _build_meta_model(config: Any, quantization_config: dict, dtype: torch.dtype, files: list[Path]) -> nn.Module:
    from transformers import AutoModelForCausalLM, EetqConfig

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, trust_remote_code=False)
    except ValueError as error:
        raise ModelError(f"cannot build a causal LM from this config.json: {error}") from error
    # This package's own quantizer, whichever one transformers has registered: the same layers
    # become EetqLinear, with the same int8 layout read from the files, as in from_pretrained.
    try:
        quantizer = EetqLoraHfQuantizer(EetqConfig.from_dict(quantization_config), pre_quantized=True)
        quantizer.preprocess_model(model, dtype=dtype, checkpoint_files=[str(path) for path in files])
    except ValueError as error:
        raise ModelError(f"cannot read this EETQ checkpoint: {error}") from error
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    return model.eval()


def _plan(model: nn.Module, stored: dict[str, _Stored]) -> _Plan:
    """Which checkpoint key fills each parameter and persistent buffer; every problem found is raised at once."""
    slots_of: dict[int, tuple[torch.Tensor, Slots, list[str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        persistent = [
            (name, b) for name, b in module._buffers.items() if name not in module._non_persistent_buffers_set
        ]
        for name, tensor in [*module._parameters.items(), *persistent]:
            if tensor is None:
                continue
            _, slots, keys = slots_of.setdefault(id(tensor), (tensor, [], []))
            if (module, name) not in slots:
                slots.append((module, name))
                keys.append(f"{path}.{name}" if path else name)
    plan, problems, missing = _Plan(), [], []
    used: set[str] = set()
    for tensor, slots, keys in slots_of.values():
        # A tied tensor (embeddings and head) is stored under any one of its names.
        key = next((key for key in keys if key in stored), None)
        if key is None:
            missing.append(keys[0])
            continue
        used.update(key for key in keys if key in stored)
        module, name = slots[0]
        load = _Load(key, slots, eetq_weight=isinstance(module, EetqLinear) and name == "weight")
        problem = _mismatch(load, tensor, stored[key])
        if problem:
            problems.append(problem)
        plan.loads.append(load)
    if missing:
        problems.insert(
            0,
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs: {_shorten(missing)}; it is incomplete, "
            "or its quantization_config (modules_to_not_convert) does not match how it was saved",
        )
    if problems:
        raise ModelError("; ".join(problems))
    plan.unused_keys = sorted(set(stored) - used)
    return plan


def _mismatch(load: _Load, tensor: torch.Tensor, entry: _Stored) -> str | None:
    expected = tuple(tensor.shape)
    if entry.shape != expected:
        hint = " (it looks transposed)" if entry.shape == expected[::-1] else ""
        return (
            f"{load.key!r} has shape {list(entry.shape)} in the checkpoint but the model needs {list(expected)}{hint}"
        )
    if entry.dtype is None:
        return f"{load.key!r} has a dtype that load_sharded cannot read"
    if load.eetq_weight and entry.dtype != torch.int8:
        return (
            f"{load.key!r} is {entry.dtype} in the checkpoint where an EETQ int8 weight belongs; if this layer was "
            "left in float, list it in the quantization_config's modules_to_not_convert"
        )
    if entry.dtype.is_floating_point != tensor.dtype.is_floating_point:
        return f"{load.key!r} is {entry.dtype} in the checkpoint but the model holds it as {tensor.dtype}"
    return None


def _attach_lora(model: nn.Module, lora_config: Any, adapter_name: str, seed: int):
    """LoRA on the meta model; returns the PeftModel and the adapters' initial values, keyed by (module, name)."""
    from ..lora.peft_glue import get_peft_model

    before = {id(module) for module in model.modules()}
    # The adapters are made on the CPU, consuming the random stream exactly as get_peft_model does in
    # one process, and the same on every rank whatever each rank's own seed. The stand-ins stop PEFT
    # from moving them after the meta base layers (which would drop their values).
    with torch.random.fork_rng(devices=[]), _stand_in_parameters(model):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    initial = {}
    for path, module in peft_model.named_modules():
        if id(module) in before:
            continue
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            if tensor.is_meta:
                raise ModelError(f"LoRA created {path}.{name} on the meta device, so it has no initial value to load")
            # Cloned: to_empty may reuse a parameter's own storage when it is not sharded.
            initial[(module, name)] = tensor.detach().clone()
    return peft_model, initial


@contextmanager
def _stand_in_parameters(model: nn.Module) -> Iterator[None]:
    """While active, every meta parameter is an empty CPU tensor of its dtype (its shape is not kept)."""
    swapped = []
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.is_meta:
                stand_in = nn.Parameter(torch.empty(0, dtype=parameter.dtype), requires_grad=parameter.requires_grad)
                module._parameters[name] = stand_in
                swapped.append((module, name, parameter, stand_in))
    try:
        yield
    finally:
        for module, name, parameter, stand_in in swapped:
            # PEFT freezes the base model through these stand-ins.
            parameter.requires_grad_(stand_in.requires_grad)
            module._parameters[name] = parameter


def _mesh_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        mesh = getattr(parameter, "device_mesh", None)
        if mesh is not None:
            if mesh.device_type == "cpu":
                return torch.device("cpu")
            return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
    return torch.device("cpu")


def _owned_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, Any]]:
    """(path, module, the nearest transformers model that contains it) for every module of ``model``."""
    from transformers import PreTrainedModel

    stack = [("", model, model)]
    while stack:
        path, module, owner = stack.pop()
        yield path, module, owner
        for name, child in module.named_children():
            child_owner = child if isinstance(child, PreTrainedModel) else owner
            stack.append((f"{path}.{name}" if path else name, child, child_owner))


def _recompute_non_persistent_buffers(model: nn.Module, skip: set[nn.Module]) -> set[tuple[nn.Module, str]]:
    """Refill the buffers a checkpoint never holds (rotary ``inv_freq``) the way from_pretrained does."""
    from transformers.initialization import guard_torch_init_functions

    written: set[tuple[nn.Module, str]] = set()
    for path, module, owner in _owned_modules(model):
        names = [name for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None]
        if not names or module in skip:
            continue
        for name in names:
            buffer = module._buffers[name]
            if buffer.is_floating_point():
                buffer.fill_(float("nan"))  # to_empty left garbage; NaN shows below whether init rewrote it
        for parameter in module.parameters(recurse=False):
            parameter._is_hf_initialized = True  # the checkpoint fills these; init must not touch them
        with guard_torch_init_functions():
            owner._init_weights(module)
        for name in names:
            if torch.isnan(module._buffers[name]).any():
                raise ModelError(
                    f"cannot recompute the buffer {path}.{name}: it is not in the checkpoint and "
                    f"{type(owner).__name__}._init_weights does not set it; load this model with from_pretrained"
                )
            written.add((module, name))
    return written


def _load_one(load: _Load, entry: _Stored, handles: dict[Path, Any], stack: ExitStack) -> None:
    handle = handles.get(entry.file)
    if handle is None:
        handle = handles[entry.file] = stack.enter_context(safe_open(str(entry.file), framework="pt"))
    module, name = load.slots[0]
    target = getattr(module, name)
    index = _local_index(target)
    layout = "plain"
    if load.eetq_weight:
        layout = resolve_layout(module.checkpoint_layout, module.in_features, module.out_features)
    if layout == "plain":
        value = handle.get_slice(load.key)[index] if index is not None else handle.get_tensor(load.key)
    else:
        value = unpack_weight(handle.get_tensor(load.key), layout, name=load.key)
        if index is not None:
            value = value[index]
    _write_local(target, value)


def _local_index(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The block of the global tensor this rank holds, or None for a tensor every rank holds whole."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(tensor, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))


def _write_local(target: torch.Tensor, value: torch.Tensor) -> None:
    local = target.to_local() if hasattr(target, "to_local") else target
    if local.shape != value.shape:
        raise RuntimeError(f"load_sharded: a local shard of shape {list(local.shape)} got {list(value.shape)}")
    local.copy_(value)


def _check_all_written(model: nn.Module, written: set[tuple[nn.Module, str]]) -> None:
    left = [
        f"{path}.{name}" if path else name
        for path, module in model.named_modules()
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]
        if tensor is not None and (module, name) not in written
    ]
    if left:
        raise RuntimeError(f"load_sharded left {len(left)} tensor(s) without a value: {_shorten(left)}")


def _shorten(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
