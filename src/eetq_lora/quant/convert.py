"""Quantize a float safetensors checkpoint folder into an EETQ checkpoint folder, tensor by tensor.

The output is what ``save_pretrained`` of an EETQ model writes (config.json with a
``quantization_config``, ``weight`` int8 [in, out] in the chosen layout, ``weight_scales`` float16
[out]), so it loads with ``from_pretrained`` after ``import eetq_lora``, and with stock
transformers + EETQ on a GPU when the layout is sm75. Only one input tensor and one output shard
are in memory at a time; the output folder appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import publish_folder
from .layout import DEFAULT_LAYOUT, METADATA_KEY, check_layout, pack_weight, resolve_layout
from .quantize import quantize_weight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that hold weights in other formats: never copied into the quantized folder.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


class CheckpointError(ValueError):
    """The source or destination folder cannot be used; the message says why and what to do."""


@dataclass
class ConversionReport:
    """What ``quantize_checkpoint`` did."""

    parameters: int
    quantized_parameters: int
    quantized_layers: int
    bytes_before: int
    bytes_after: int
    seconds: float
    layout: str
    modules_to_not_convert: list[str]

    @property
    def parameters_per_second(self) -> float:
        return self.parameters / self.seconds if self.seconds > 0 else float("inf")


def quantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    modules_to_not_convert: Iterable[str] = ("lm_head",),
    layout: str = DEFAULT_LAYOUT,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Write an EETQ int8 copy of the float safetensors checkpoint folder ``src`` to the folder ``out``.

    Every ``nn.Linear`` weight of the model that ``src/config.json`` describes is quantized, except
    modules matching ``modules_to_not_convert`` and weights tied to another tensor; everything else,
    and the tokenizer, generation and other non-weight files, is copied. ``threads`` weights are
    quantized at a time, each on one core (default: every core). Raises CheckpointError for
    unusable folders.
    """
    started = time.perf_counter()
    layout = check_layout(layout)
    src, out = Path(src), Path(out)
    shards, index = _source_shards(src)
    _check_destination(src, out, overwrite)
    config = _read_config(src)
    linear_weights, skips = linear_weight_names(src, modules_to_not_convert)

    workers = threads or os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    # One single-threaded torch op stream per worker, one tensor each: this keeps every core busy
    # without the per-op thread synchronisation that stalls intra-op threads on a shared machine.
    torch.set_num_threads(1)
    totals: dict = {}

    def build(staging: Path) -> None:
        totals.update(_convert_shards(src, staging, shards, linear_weights, layout, workers, progress))
        missing = linear_weights - totals.pop("found")
        if missing:
            raise CheckpointError(
                f"{src} has no tensor for {len(missing)} linear weight(s) of its model, e.g. {sorted(missing)[:3]}; "
                "its tensor names differ from the model's. Load it with from_pretrained(..., "
                "quantization_config=EetqConfig('int8')) and save_pretrained instead"
            )
        if index is not None:
            new_index = {"metadata": {"total_size": totals["bytes_after"]}, "weight_map": totals["weight_map"]}
            (staging / INDEX_FILE).write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
        config["quantization_config"] = {
            "quant_method": "eetq",
            "weights": "int8",
            "modules_to_not_convert": skips,
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_other_files(src, staging)

    try:
        publish_folder(build, out, if_exists="replace" if overwrite else "error")
    except FileExistsError as error:
        raise CheckpointError(str(error)) from None
    finally:
        torch.set_num_threads(previous_threads)
    return ConversionReport(
        parameters=totals["parameters"],
        quantized_parameters=totals["quantized_parameters"],
        quantized_layers=len(linear_weights),
        bytes_before=totals["bytes_before"],
        bytes_after=totals["bytes_after"],
        seconds=time.perf_counter() - started,
        layout=layout,
        modules_to_not_convert=skips,
    )


def linear_weight_names(
    src: str | os.PathLike, modules_to_not_convert: Iterable[str] = ("lm_head",)
) -> tuple[set[str], list[str]]:
    """The ``*.weight`` names to quantize for the model in ``src``, and the full skip list.

    The model is built from ``src/config.json`` on the meta device (no weights are read); its
    ``nn.Linear`` modules are the candidates. The skip list adds tied weights and the model's
    float32-only modules to ``modules_to_not_convert``, as transformers' loader does.
    """
    from transformers import AutoConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read the model config in {src}: {error}") from error
    model = _meta_model(config, src)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    tied |= set((getattr(model, "all_tied_weights_keys", {}) or {}).values())
    skips = list(
        dict.fromkeys(
            list(modules_to_not_convert or ())
            + sorted(name.removesuffix(".weight") for name in tied)
            + sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
        )
    )
    names = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, skips)
    }
    if not names:
        raise CheckpointError(f"the model in {src} has no nn.Linear layer left to quantize (skipping {skips})")
    return names, skips


def _meta_model(config, src: Path) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            pass
        for architecture in getattr(config, "architectures", None) or ():
            model_class = getattr(transformers, architecture, None)
            if model_class is not None:
                return model_class(config)
    raise CheckpointError(
        f"transformers cannot build the model described by {src / 'config.json'} "
        f"(model_type {getattr(config, 'model_type', None)!r}, architectures {getattr(config, 'architectures', None)})"
    )


def _source_shards(src: Path) -> tuple[list[str], dict | None]:
    if not src.is_dir():
        raise CheckpointError(f"source folder {src} does not exist (or is not a folder)")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json; point SRC at a transformers model folder")
    if (src / INDEX_FILE).is_file():
        index = json.loads((src / INDEX_FILE).read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        absent = [shard for shard in shards if not (src / shard).is_file()]
        if not shards or absent:
            raise CheckpointError(f"{src / INDEX_FILE} lists shard files that are missing: {absent or 'none listed'}")
        return shards, index
    if (src / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    others = sorted(path.name for path in src.iterdir() if path.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise CheckpointError(
        f"{src} has no {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {', '.join(others)})" if others else "")
        + "; save the model with save_pretrained(..., safe_serialization=True) first"
    )


def _check_destination(src: Path, out: Path, overwrite: bool) -> None:
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real or src_real.is_relative_to(out_real) or out_real.is_relative_to(src_real):
        raise CheckpointError(f"the output folder {out} must be outside the source folder {src} and not contain it")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another output folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if not out.parent.is_dir():
        raise CheckpointError(f"the parent folder of {out} does not exist")


def _read_config(src: Path) -> dict:
    config = json.loads((src / "config.json").read_text())
    existing = config.get("quantization_config")
    if existing:
        method = existing.get("quant_method") if isinstance(existing, dict) else existing
        raise CheckpointError(f"{src} is already quantized (quant_method {method!r}); start from a float checkpoint")
    return config


def _convert_shards(
    src: Path,
    staging: Path,
    shards: list[str],
    linear_weights: set[str],
    layout: str,
    workers: int,
    progress: bool,
) -> dict:
    from tqdm import tqdm

    totals = {"parameters": 0, "quantized_parameters": 0, "bytes_before": 0, "bytes_after": 0}
    weight_map, found = {}, set()
    total_bytes = sum((src / shard).stat().st_size for shard in shards)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="quantizing", disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for shard in shards:
            output: dict[str, torch.Tensor] = {}
            in_flight: deque = deque()
            with safe_open(str(src / shard), framework="pt") as handle:
                for key in handle.keys():
                    # Tensors are read here, in order; quantizing runs in the workers (torch releases the GIL).
                    tensor = handle.get_tensor(key)
                    size = tensor.numel() * tensor.element_size()
                    totals["parameters"] += tensor.numel()
                    totals["bytes_before"] += size
                    if key in linear_weights:
                        _check_linear_weight(shard, key, tensor)
                        totals["quantized_parameters"] += tensor.numel()
                        found.add(key)
                        in_flight.append((size, pool.submit(_quantize_tensor, key, tensor, layout)))
                    else:
                        output[key] = tensor
                        bar.update(size)
                    del tensor
                    # A bounded queue keeps memory near one shard however far reading runs ahead.
                    while len(in_flight) > 2 * workers:
                        _finish_oldest(in_flight, output, bar)
                while in_flight:
                    _finish_oldest(in_flight, output, bar)
            output = dict(sorted(output.items()))
            for key, tensor in output.items():
                weight_map[key] = shard
                totals["bytes_after"] += tensor.numel() * tensor.element_size()
            save_file(output, str(staging / shard), metadata={"format": "pt", METADATA_KEY: layout})
            del output
    totals["weight_map"] = dict(sorted(weight_map.items()))
    totals["found"] = found
    return totals


def _finish_oldest(in_flight: deque, output: dict, bar) -> None:
    size, job = in_flight.popleft()
    output.update(job.result())
    bar.update(size)


def _check_linear_weight(shard: str, key: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise CheckpointError(
            f"{shard}: {key} should be a float 2-D nn.Linear weight, got {tensor.dtype} {list(tensor.shape)}"
        )


def _quantize_tensor(key: str, weight: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    q, scales = quantize_weight(weight, name=key.removesuffix(".weight"))
    packed = pack_weight(q, resolve_layout(layout, *q.shape), name=key.removesuffix(".weight"))
    return {key: packed, key + "_scales": scales}


def _copy_other_files(src: Path, staging: Path) -> None:
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in ("config.json", INDEX_FILE) or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, staging / path.name)
