"""Finding the model a user named, choosing dtype and device, and loading it quantized with its memory counted."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from eetq_lora import EetqLinear
from eetq_lora.errors import ConfigError, ModelError
from eetq_lora.models import (
    check_model_spec,
    default_device,
    load_quantized,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from eetq_lora.models import load as load_module
from eetq_lora.models.load import available_devices, cpu_has_fast_bfloat16, float32_bytes
from eetq_lora.quant.convert import quantize_checkpoint
from eetq_lora.quant.model import tensor_bytes
from tests.helpers import make_tokenizer

# --- which model -------------------------------------------------------------------------------


def test_bad_model_paths_are_refused_before_loading(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_model_spec(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        check_model_spec(str(tmp_path / "weights.bin"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_model_spec(str(tmp_path / "folder"))


def test_model_path_errors_say_what_to_pass_instead(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    expected = {
        "missing": f"model path {tmp_path / 'missing'} does not exist; pass a Hugging Face model folder or a .gguf "
        "file to --model, or leave --model out for the built-in SmolLM2-135M-Instruct",
        "weights.bin": f"model file {tmp_path / 'weights.bin'} is not a .gguf file; pass a .gguf file or a Hugging "
        "Face model folder (with config.json)",
        "folder": f"model folder {tmp_path / 'folder'} has no config.json; pass a folder saved with "
        "save_pretrained(), or a .gguf file",
    }
    for name, message in expected.items():
        with pytest.raises(ModelError) as error:
            check_model_spec(str(tmp_path / name))
        assert str(error.value) == message


def test_gguf_files_and_model_folders_are_accepted(tmp_path, monkeypatch):
    (tmp_path / "model.GGUF").write_bytes(b"GGUF")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    check_model_spec(str(tmp_path / "model.GGUF"))
    check_model_spec(str(tmp_path / "folder"))
    monkeypatch.setenv("HOME", str(tmp_path))
    check_model_spec("~/folder")


def test_resolve_model_converts_gguf_files_and_keeps_folders(tmp_path, monkeypatch):
    converted = []

    def fake_gguf_to_folder(path, quiet=False):
        converted.append((path, quiet))
        return tmp_path / "converted"

    monkeypatch.setattr(load_module, "gguf_to_folder", fake_gguf_to_folder)
    monkeypatch.setattr(load_module, "default_gguf_path", lambda: tmp_path / "builtin.gguf")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")

    folder = resolve_model(str(tmp_path / "folder"))
    assert folder == load_module.ModelSource(tmp_path / "folder", str(tmp_path / "folder"), str(tmp_path / "folder"))
    assert converted == []
    gguf = resolve_model(str(tmp_path / "m.gguf"), quiet=True)
    assert gguf == load_module.ModelSource(tmp_path / "converted", str(tmp_path / "m.gguf"), str(tmp_path / "m.gguf"))
    builtin = resolve_model(None)
    assert builtin == load_module.ModelSource(tmp_path / "converted", "SmolLM2-135M-Instruct (built-in)", None)
    assert converted == [(tmp_path / "m.gguf", True), (tmp_path / "builtin.gguf", False)]


# --- dtype -----------------------------------------------------------------------------------


def test_auto_dtype_follows_the_cpu_bfloat16_support(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(load_module, "cpu_has_fast_bfloat16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(load_module, "cpu_has_fast_bfloat16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int4", cpu)


def test_named_dtypes_and_the_choices_an_unknown_name_lists():
    cpu = torch.device("cpu")
    assert [resolve_dtype(name, cpu) for name in ("float32", "bfloat16", "float16")] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ]
    with pytest.raises(ValueError) as error:
        resolve_dtype("fp16", cpu)
    assert str(error.value) == "unknown dtype 'fp16'; choose one of auto, float32, bfloat16, float16"


def test_auto_dtype_on_a_gpu_is_bfloat16_where_supported_else_float16(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float16


def test_auto_dtype_on_other_devices_is_float32(monkeypatch):
    monkeypatch.setattr(load_module, "cpu_has_fast_bfloat16", lambda: True)
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32


def test_fast_bfloat16_probes_are_guarded(monkeypatch):
    def broken_probe():
        raise RuntimeError("probe failed")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken_probe, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu_has_fast_bfloat16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_has_fast_bfloat16() is True
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cpu_has_fast_bfloat16() is True
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_has_fast_bfloat16() is False


# --- devices -------------------------------------------------------------------------------------


def hide_gpus(monkeypatch, count: int) -> None:
    """Make this process see ``count`` CUDA GPUs and no other accelerator."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for backend in ("xpu", "mps"):
        if hasattr(torch, backend) and hasattr(getattr(torch, backend), "is_available"):
            monkeypatch.setattr(getattr(torch, backend), "is_available", lambda: False)


def test_device_names_are_checked_against_this_machine(monkeypatch):
    hide_gpus(monkeypatch, 2)
    assert default_device("cuda:1") == torch.device("cuda", 1)
    assert default_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"sees 2 cuda device\(s\); use one of: cpu, cuda:0, cuda:1$"):
        default_device("cuda:2")
    with pytest.raises(ConfigError, match="use one of: cpu, cuda:0, cuda:1"):
        default_device("meta")
    hide_gpus(monkeypatch, 0)
    assert default_device("cpu") == torch.device("cpu") and default_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"device '{name}' is not available: .*; use one of: cpu$"):
            default_device(name)
    for name in ("tpu9", "", "cuda:-1", "cpu:x"):
        with pytest.raises(ConfigError, match="is not a device name; use one of: cpu$"):
            default_device(name)


def test_auto_picks_the_gpu_of_this_rank(monkeypatch):
    hide_gpus(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError) as error:
        default_device("auto")
    assert str(error.value) == (
        "device 'auto' is not available: this process sees 2 cuda device(s); use one of: cpu, cuda:0, cuda:1"
    )


def test_available_devices_lists_the_cpu_then_each_gpu(monkeypatch):
    hide_gpus(monkeypatch, 0)
    assert available_devices() == ["cpu"]
    hide_gpus(monkeypatch, 3)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1", "cuda:2"]


def test_a_device_type_eetq_lora_does_not_run_on_is_refused(monkeypatch):
    hide_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError) as error:
        default_device("meta")
    assert str(error.value) == (
        "device 'meta' is not available: eetq-lora runs on cpu, cuda, xpu or mps devices; use one of: cpu"
    )


# --- memory counts -------------------------------------------------------------------------------


class Counted(nn.Module):
    """A float32 linear, a bfloat16 parameter, an int8 buffer, a float16 weight_scales buffer and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)  # 12 + 4 float32 values
        self.low = nn.Parameter(torch.zeros(6, dtype=torch.bfloat16))
        self.register_buffer("codes", torch.zeros(5, dtype=torch.int8))
        self.register_buffer("weight_scales", torch.zeros(7, dtype=torch.float16))
        self.tied = nn.Linear(3, 4, bias=False)
        self.tied.weight = self.linear.weight


def test_tensor_bytes_counts_each_tensor_once_at_its_own_size():
    assert tensor_bytes(Counted()) == 16 * 4 + 6 * 2 + 5 * 1 + 7 * 2


def test_float32_bytes_counts_four_bytes_a_value_without_the_scales():
    assert float32_bytes(Counted()) == (16 + 6 + 5) * 4


def test_a_quantized_layer_has_the_float32_size_of_the_layer_it_came_from():
    linear = nn.Linear(64, 32)
    quantized = EetqLinear.from_linear(linear, torch.float32)
    assert float32_bytes(quantized) == float32_bytes(linear) == (64 * 32 + 32) * 4
    assert tensor_bytes(quantized) == 64 * 32 * 1 + 32 * 2 + 32 * 4  # int8 weight, fp16 scales, float32 bias


# --- loading a folder --------------------------------------------------------------------------


def test_load_tokenizer_pads_with_the_end_token_when_there_is_no_pad_token(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "with-pad")
    assert load_tokenizer(tmp_path / "with-pad").pad_token == "<pad>"
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "without-pad")
    loaded = load_tokenizer(tmp_path / "without-pad")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_quantized_converts_every_linear_but_the_head_and_counts_memory(tiny_model, dtype):
    source = resolve_model(str(tiny_model))
    assert source.folder == tiny_model.resolve()
    loaded = load_quantized(source, dtype, torch.device("cpu"))
    model = loaded.model
    quantized = [name for name, m in model.named_modules() if isinstance(m, EetqLinear)]
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == ["lm_head"]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert model.lm_head.weight.dtype == dtype
    assert loaded.parameters == sum(p.numel() for p in type(model).from_pretrained(tiny_model).parameters())
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, EetqLinear))
    scales = sum(m.weight_scales.numel() for m in model.modules() if isinstance(m, EetqLinear))
    other = loaded.parameters - linear_params
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith("weight_scales"))
    expected = linear_params * 1 + scales * 2 + other * dtype.itemsize + buffers
    assert loaded.quantized_bytes == expected
    assert loaded.float32_bytes > loaded.quantized_bytes
    assert loaded.tokenizer.pad_token_id is not None


def test_an_eetq_checkpoint_loads_as_the_float_model_quantized(tiny_model, tmp_path):
    quantize_checkpoint(tiny_model, tmp_path / "int8", layout="plain", progress=False)
    cpu = torch.device("cpu")
    from_float = load_quantized(resolve_model(str(tiny_model)), torch.float32, cpu)
    from_int8 = load_quantized(resolve_model(str(tmp_path / "int8")), torch.float32, cpu)
    assert from_int8.float32_bytes == from_float.float32_bytes
    assert from_int8.quantized_bytes == from_float.quantized_bytes
    # The in-memory tensors, not the state dicts: those store the int8 weights in each model's checkpoint layout.
    ours = {**dict(from_int8.model.named_parameters()), **dict(from_int8.model.named_buffers())}
    theirs = {**dict(from_float.model.named_parameters()), **dict(from_float.model.named_buffers())}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_layers_an_eetq_checkpoint_kept_in_float_stay_float(tiny_model, tmp_path):
    quantize_checkpoint(tiny_model, tmp_path / "int8", modules_to_not_convert=["lm_head", "mlp.down_proj"])
    loaded = load_quantized(resolve_model(str(tmp_path / "int8")), torch.float32, torch.device("cpu"))
    down = loaded.model.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and isinstance(loaded.model.model.layers[0].mlp.up_proj, EetqLinear)
    assert loaded.model.config.quantization_config.modules_to_not_convert == ["lm_head", "mlp.down_proj"]


def test_a_tensor_of_the_wrong_shape_or_a_nan_weight_is_a_model_error(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    cases = {
        "wrong shape": (lambda t: t[:-1], "could not load the model in"),
        "nan weight": (lambda t: t.clone().fill_(float("nan")), "cannot quantize the model in"),
    }
    for case, (change, message) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(tiny_model, folder)
        tensors = load_file(folder / "model.safetensors")
        key = "model.layers.0.mlp.down_proj.weight"
        tensors[key] = change(tensors[key])
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ModelError, match=message) as error:
            load_quantized(resolve_model(str(folder)), torch.float32, torch.device("cpu"))
        assert "\n" not in str(error.value), case


def test_unreadable_weights_are_a_model_error_naming_the_folder(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    source = resolve_model(str(folder))
    with pytest.raises(ModelError) as error:
        load_quantized(source, torch.float32, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"could not load the model in {folder}: ") and "\n" not in message
    assert message.endswith("; copy the folder again or re-save it with save_pretrained()")
