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
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import FolderLock, find_leftovers, publish_folder, remove_path, restore_replaced
from ..errors import UserError
from ..format.layout import DEFAULT_LAYOUT, METADATA_KEY, check_layout, pack_weight, resolve_layout
from ..format.quantize import quantize_weight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that hold weights in other formats: never copied into the quantized folder.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# safetensors dtype names of the weights quantize_weight accepts.
_QUANTIZABLE_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_RESAVE = "copy the model folder again, or re-save it with save_pretrained()"


class CheckpointError(UserError, ValueError):
    """The source or destination folder cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class _Plan:
    """What the model that config.json describes expects: the weights to quantize and every tensor's shape."""

    linear_weights: set[str]
    skips: list[str]
    shapes: dict[str, tuple[int, ...]]


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
    plan = _plan(src, modules_to_not_convert)
    linear_weights, skips = plan.linear_weights, plan.skips
    # Every shard's header is read before anything is written: a corrupt file or a tensor whose shape
    # does not fit config.json would otherwise give a folder that from_pretrained cannot load.
    _check_shards(src, shards, plan)

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
        # One writer per OUT; put back an OUT that a kill mid-swap left hidden, and drop killed builds.
        with FolderLock(out, "another eetq-lora quantize", "wait for it to finish, or pass a different OUT"):
            restore_replaced(out)
            for leftover in find_leftovers(out.parent, out.name):
                remove_path(leftover)
            _check_destination(src, out, overwrite)
            publish_folder(build, out, if_exists="replace" if overwrite else "error")
    except FileExistsError as error:
        raise CheckpointError(str(error)) from None
    except OSError as error:
        raise CheckpointError(
            f"could not write {out} ({error}); nothing was written: check free disk space and permissions"
        ) from None
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
    plan = _plan(Path(src), modules_to_not_convert)
    return plan.linear_weights, plan.skips


def _plan(src: Path, modules_to_not_convert: Iterable[str]) -> _Plan:
    from transformers import AutoConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    requested = list(modules_to_not_convert or ())
    _check_skip_patterns(requested)
    config_file = src / "config.json"
    recorded = _read_json(config_file)
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except Exception as error:
        if "model_type" not in recorded:
            raise CheckpointError(f'{config_file} has no model_type (such as "llama"); {_RESAVE}') from None
        raise CheckpointError(f"cannot read the model config in {src}: {_first_line(error)}") from None
    model = _meta_model(config, src)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    tied |= set((getattr(model, "all_tied_weights_keys", {}) or {}).values())
    skips = list(
        dict.fromkeys(
            requested
            + sorted(name.removesuffix(".weight") for name in tied)
            + sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
        )
    )
    names = [name for name, _ in model.named_modules() if name]
    # A typo would keep nothing in float and quantize what was meant to stay. The default, lm_head,
    # may match nothing: not every architecture names its head so.
    unmatched = [
        pattern
        for pattern in requested
        if pattern != "lm_head" and all(should_convert_module(name, [pattern]) for name in names)
    ]
    if unmatched:
        raise CheckpointError(
            f"the modules to keep in float {unmatched} match no module of the model in {src}; pass module names "
            "such as lm_head or mlp.down_proj, or patterns that match them"
        )
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, skips)
    }
    if not linears:
        raise CheckpointError(f"the model in {src} has no nn.Linear layer left to quantize (skipping {skips})")
    for name, module in linears.items():
        if module.weight.numel() == 0:
            raise CheckpointError(
                f"{config_file} gives layer {name} an empty weight {list(module.weight.shape)}, which cannot be "
                f"quantized; fix config.json, or keep it in float by adding {name.rsplit('.', 1)[-1]} to --skip"
            )
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict(keep_vars=True).items()}
    return _Plan({f"{name}.weight" for name in linears}, skips, shapes)


def _check_skip_patterns(patterns: list) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise CheckpointError(f"modules to keep in float must be names or patterns (strings), got {pattern!r}")
        try:
            # The form transformers matches module names with.
            re.compile(rf"(?:{pattern})")
        except re.error as error:
            raise CheckpointError(
                f"skip pattern {pattern!r} is not a valid regular expression ({error.msg}); "
                "escape characters such as ( [ * + ? with a backslash, or pass the plain module name"
            ) from None


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _meta_model(config, src: Path) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    described = (
        f"the model described by {src / 'config.json'} (model_type {getattr(config, 'model_type', None)!r}, "
        f"architectures {getattr(config, 'architectures', None)})"
    )
    try:
        with torch.device("meta"):
            try:
                return AutoModelForCausalLM.from_config(config)
            except ValueError:
                pass
            for architecture in getattr(config, "architectures", None) or ():
                model_class = getattr(transformers, architecture, None)
                if model_class is not None:
                    return model_class(config)
    except Exception as error:
        # Settings the architecture cannot use (a negative size, heads that do not divide the width, ...).
        raise CheckpointError(f"transformers cannot build {described}: {_first_line(error)}; fix config.json") from None
    raise CheckpointError(f"transformers cannot build {described}")


def _source_shards(src: Path) -> tuple[list[str], dict | None]:
    if not src.is_dir():
        raise CheckpointError(f"source folder {src} does not exist (or is not a folder)")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json; point SRC at a transformers model folder")
    if (src / INDEX_FILE).is_file():
        index = _read_json(src / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
        ):
            raise CheckpointError(
                f"{src / INDEX_FILE} has no weight_map object from tensor names to shard files; {_RESAVE}"
            )
        shards = sorted(set(weight_map.values()))
        # Shard names become output file names too: only plain .safetensors names inside the folder.
        odd = [shard for shard in shards if Path(shard).name != shard or not shard.endswith(".safetensors")]
        if odd:
            raise CheckpointError(
                f"{src / INDEX_FILE} lists {odd[0]!r}, which is not a .safetensors file name in {src}; {_RESAVE}"
            )
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


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or a CheckpointError saying why it is unusable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}); restore it from the original model"
        ) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; restore it from the original model") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path} should hold a JSON object, not a {type(value).__name__}; restore it from the original model"
        )
    return value


def _open_safetensors(path: Path):
    """``safe_open(path)``, or a CheckpointError for an empty, truncated or corrupt file."""
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes); {_RESAVE}")
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_first_line(error)}): it is truncated or corrupt; {_RESAVE}"
        ) from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None


def _check_shards(src: Path, shards: list[str], plan: _Plan) -> None:
    """Refuse unreadable shards and tensors that do not fit the model config.json describes (headers only)."""
    mismatched: list[str] = []
    for shard in shards:
        with _open_safetensors(src / shard) as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                shape, dtype = tuple(view.get_shape()), view.get_dtype()
                expected = plan.shapes.get(key)
                if expected is not None and shape != expected:
                    mismatched.append(f"{shard}: {key} has shape {list(shape)}, config.json implies {list(expected)}")
                elif key in plan.linear_weights and dtype not in _QUANTIZABLE_DTYPES:
                    raise CheckpointError(
                        f"{shard}: {key} is {dtype}; only {', '.join(_QUANTIZABLE_DTYPES.values())} "
                        "nn.Linear weights can be quantized: save the model in one of them"
                    )
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{mismatched[0]}{more}: the weights do not belong to {src / 'config.json'}; "
            "use the config.json that was saved with these weights"
        )


def _read_config(src: Path) -> dict:
    config = _read_json(src / "config.json")
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
    # Like the other commands' bars: drawn on a terminal only, never into a log file or a pipe.
    shown = progress and sys.stderr.isatty()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="quantizing", disable=not shown)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for shard in shards:
                output = _convert_shard(src, shard, linear_weights, layout, pool, workers, bar, totals, found)
                for key, tensor in output.items():
                    weight_map[key] = shard
                    totals["bytes_after"] += tensor.numel() * tensor.element_size()
                save_file(output, str(staging / shard), metadata={"format": "pt", METADATA_KEY: layout})
                del output
        except BaseException:
            # Ctrl-C or a bad tensor: drop the queued weights rather than quantize them for nothing.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    totals["weight_map"] = dict(sorted(weight_map.items()))
    totals["found"] = found
    return totals


def _convert_shard(
    src: Path,
    shard: str,
    linear_weights: set[str],
    layout: str,
    pool: ThreadPoolExecutor,
    workers: int,
    bar,
    totals: dict,
    found: set[str],
) -> dict[str, torch.Tensor]:
    """The output tensors of one shard, sorted by name: linear weights quantized, everything else as it was."""
    output: dict[str, torch.Tensor] = {}
    in_flight: deque = deque()
    with _open_safetensors(src / shard) as handle:
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
    return dict(sorted(output.items()))


def _finish_oldest(in_flight: deque, output: dict, bar) -> None:
    size, job = in_flight.popleft()
    output.update(job.result())
    bar.update(size)


def _check_linear_weight(shard: str, key: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
        raise CheckpointError(
            f"{shard}: {key} should be a non-empty float 2-D nn.Linear weight, got {tensor.dtype} {list(tensor.shape)}"
        )


def _quantize_tensor(key: str, weight: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    name = key.removesuffix(".weight")
    try:
        q, scales = quantize_weight(weight, name=name)
    except ValueError as error:
        # Weights EETQ cannot represent (inf/NaN, out of range): say which layer, and how to keep it in float.
        raise CheckpointError(f"{error}, or keep it in float by adding {name} to --skip") from None
    packed = pack_weight(q, resolve_layout(layout, *q.shape), name=name)
    return {key: packed, key + "_scales": scales}


def _copy_other_files(src: Path, staging: Path) -> None:
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in ("config.json", INDEX_FILE) or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, staging / path.name)
