"""Bad input to quantize, generate and eval: one line naming the problem and the fix, exit code 1 (130 for
Ctrl-C), no traceback, and nothing half-written left behind."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import eetq_lora
import eetq_lora.quant.convert as convert_module
from eetq_lora.cli.generate import parse_seed
from eetq_lora.cli.main import main
from tests.helpers import tiny_llama

PROMPT = "what does the cat say ?"


def error_line(capsys, command: str) -> str:
    """The one line a failed command printed on stderr (and nothing else, no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"eetq-lora {command}: "), err
    assert "Traceback" not in err
    return lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---- quantize ------------------------------------------------------------------------------------


def float_folder(path: Path, max_shard_size: str | None = None, **overrides) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    tiny_llama(**overrides).save_pretrained(path, **kwargs)
    return path


def quantize(capsys, src: Path, out: Path, *extra: str) -> tuple[int, str]:
    """Run ``quantize SRC OUT`` in this process; the exit code and the one line it printed on stderr."""
    capsys.readouterr()  # drop what building the folders printed
    code = main(["quantize", str(src), str(out), "--no-progress", *extra])
    return code, error_line(capsys, "quantize")


def expect_refused(capsys, src: Path, out: Path, *extra: str, message: str) -> str:
    code, line = quantize(capsys, src, out, *extra)
    assert code == 1 and line.startswith("eetq-lora quantize: error: ") and message in line, line
    assert not out.exists() and leftovers(out.parent, out.name) == []
    return line


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    return random.Random(0).randbytes(len(data))


def _header_only(data: bytes) -> bytes:
    return data[:5]


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncated, "truncated or corrupt"),
        (_garbage, "truncated or corrupt"),
        (_header_only, "truncated or corrupt"),
        (lambda data: b"", "is empty (0 bytes)"),
    ],
    ids=["truncated", "garbage", "five-bytes", "empty"],
)
def test_unreadable_safetensors_file(tmp_path, capsys, damage, message):
    src = float_folder(tmp_path / "float")
    weights = src / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    line = expect_refused(capsys, src, tmp_path / "out", message=message)
    assert str(weights) in line


def test_unreadable_shard_of_a_sharded_checkpoint(tmp_path, capsys):
    src = float_folder(tmp_path / "float", max_shard_size="100KB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(_truncated(shard.read_bytes()))
    line = expect_refused(capsys, src, tmp_path / "out", message="truncated or corrupt")
    assert shard.name in line


@pytest.mark.parametrize(
    "text, message",
    [("{not json", "config.json is not valid JSON"), ("[1, 2]", "config.json should hold a JSON object, not a list")],
)
def test_malformed_config_json(tmp_path, capsys, text, message):
    src = float_folder(tmp_path / "float")
    (src / "config.json").write_text(text)
    expect_refused(capsys, src, tmp_path / "out", message=message)


def test_config_json_without_model_type(tmp_path, capsys):
    src = float_folder(tmp_path / "float")
    config = json.loads((src / "config.json").read_text())
    del config["model_type"]
    (src / "config.json").write_text(json.dumps(config))
    expect_refused(capsys, src, tmp_path / "out", message="config.json has no model_type")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{oops", "model.safetensors.index.json is not valid JSON"),
        ("[]", "should hold a JSON object, not a list"),
        ('{"weight_map": ["model-00001-of-00004.safetensors"]}', "has no weight_map object"),
        ('{"weight_map": {"lm_head.weight": 3}}', "has no weight_map object"),
        # Shard names become output file names: one that leads out of the folder is refused.
        ('{"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}', "is not a .safetensors file name"),
    ],
    ids=["not-json", "list", "map-is-a-list", "shard-is-a-number", "path-outside"],
)
def test_malformed_index(tmp_path, capsys, text, message):
    src = float_folder(tmp_path / "float", max_shard_size="100KB")
    (src / "model.safetensors.index.json").write_text(text)
    expect_refused(capsys, src, tmp_path / "out", message=message)
    assert not (tmp_path / "elsewhere.safetensors").exists()


def test_zero_size_linear_layer(tmp_path, capsys):
    src = float_folder(tmp_path / "float", intermediate_size=0)
    line = expect_refused(capsys, src, tmp_path / "out", message="an empty weight")
    assert "gate_proj" in line and "--skip" in line


def test_invalid_skip_pattern(tmp_path, capsys):
    src = float_folder(tmp_path / "float")
    line = expect_refused(capsys, src, tmp_path / "out", "--skip", "lm_head", "(", message="is not a valid regular")
    assert "'('" in line


def test_weights_that_do_not_fit_config_json_are_refused(tmp_path, capsys):
    # Weights of a wider model next to the config.json of the narrow one.
    src = float_folder(tmp_path / "float", intermediate_size=256)
    narrow = tiny_llama().config
    narrow.save_pretrained(src)
    line = expect_refused(capsys, src, tmp_path / "out", message="config.json implies")
    # The shapes named are the ones an independent build of the config gives.
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    down = expected.model.layers[0].mlp.down_proj.weight
    assert f"down_proj.weight has shape [64, 256], config.json implies {list(down.shape)}" in line
    assert "(and 5 more)" in line  # gate, up and down of both layers
    # What the refusal protects against: this folder cannot be loaded as the config describes it.
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error type is not the point
        AutoModelForCausalLM.from_pretrained(src)


def test_non_finite_weight_is_one_line(tmp_path, capsys):
    src = float_folder(tmp_path / "float")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    line = expect_refused(capsys, src, tmp_path / "out", message="inf or NaN")
    assert "model.layers.1.self_attn.v_proj" in line and "--skip" in line


def test_float64_linear_weight_is_refused_before_writing(tmp_path, capsys):
    src = float_folder(tmp_path / "float")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].double()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    expect_refused(capsys, src, tmp_path / "out", message="model.layers.0.mlp.up_proj.weight is F64")


def _interrupt_in_worker(monkeypatch):
    calls = []
    real = convert_module.quantize_weight

    def interrupted(weight, name=None):
        calls.append(name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(weight, name=name)

    monkeypatch.setattr(convert_module, "quantize_weight", interrupted)


def _interrupt_while_reading(monkeypatch):
    calls = []
    real = convert_module._check_linear_weight

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(convert_module, "_check_linear_weight", interrupted)


@pytest.mark.parametrize("interrupt", [_interrupt_in_worker, _interrupt_while_reading], ids=["worker", "reader"])
def test_ctrl_c_exits_130_and_leaves_no_output(tmp_path, capsys, monkeypatch, interrupt):
    src = float_folder(tmp_path / "float")
    out = tmp_path / "int8"
    interrupt(monkeypatch)
    code, line = quantize(capsys, src, out, "--threads", "1")
    assert code == 130 and line == "eetq-lora quantize: interrupted; nothing was saved."
    assert not out.exists() and leftovers(tmp_path, "int8") == []
    # With --overwrite the previous folder is kept as it was.
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    interrupt(monkeypatch)
    code, _ = quantize(capsys, src, out, "--overwrite")
    assert code == 130 and [p.name for p in out.iterdir()] == ["previous.txt"] and leftovers(tmp_path, "int8") == []


SLOW_QUANTIZE = """
import pathlib, sys, time
import eetq_lora.quant.convert as convert
from eetq_lora.cli.main import main

ready, real = pathlib.Path(sys.argv[1]), convert.quantize_weight

def slow(weight, name=None):
    ready.touch()
    time.sleep(0.5)
    return real(weight, name=name)

convert.quantize_weight = slow
sys.exit(main(["quantize", *sys.argv[2:]]))
"""


def test_real_sigint_during_quantize(tmp_path):
    """A real SIGINT to a running ``quantize`` (each weight slowed down so that it arrives mid-way)."""
    src = float_folder(tmp_path / "float")
    out, ready = tmp_path / "int8", tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_QUANTIZE, str(ready), str(src), str(out), "--threads", "1", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), child.communicate()[1]
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert "eetq-lora quantize: interrupted; nothing was saved." in err and "Traceback" not in err, err
    assert not out.exists() and leftovers(tmp_path, "int8") == []


# ---- generate and eval: adapter folders ----------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter of the tiny model saved by PEFT (its base model is recorded as the tiny model's folder)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = eetq_lora.get_peft_model(eetq_lora.quantize_model(model), LoraConfig(r=4, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    return folder


def damaged_copy(adapter: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(adapter, folder)
    return folder


def command_line(command: str, folder: Path, qa_file: Path, *extra: str) -> list[str]:
    if command == "generate":
        return ["generate", "--adapter", str(folder), "--max-new-tokens", "3", *extra, PROMPT]
    return ["eval", "--adapter", str(folder), "--data", str(qa_file), "--eval-examples", "4", *extra]


def expect_error(capsys, argv: list[str], message: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    line = error_line(capsys, argv[0])
    assert line.startswith(f"eetq-lora {argv[0]}: error: ") and message in line, line
    return line


def _no_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


def _truncated_weights(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(_truncated(weights.read_bytes()))


def _garbage_weights(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(_garbage(weights.read_bytes()))


def _config_not_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA",')


def _config_a_list(folder: Path) -> None:
    (folder / "adapter_config.json").write_text('["LORA"]')


def _run_config_not_json(folder: Path) -> None:
    (folder / "run_config.json").write_text("{settings")


def _run_config_settings_not_an_object(folder: Path) -> None:
    (folder / "run_config.json").write_text('{"settings": [1, 2]}')


def _refused_pickle(folder: Path) -> None:
    # A .bin that holds an object besides tensors: torch.load(weights_only=True) refuses it.
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "extra": argparse.Namespace(note="not a tensor")}, folder / "adapter_model.bin")


def _truncated_pickle(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    data = (folder / "adapter_model.bin").read_bytes()
    (folder / "adapter_model.bin").write_bytes(data[: len(data) // 2])


ADAPTER_DAMAGE = [
    # A half-moved folder: the config arrived, the weights did not (PEFT would look for them on the Hub).
    (_no_weights, "has adapter_config.json but no adapter weights (adapter_model.safetensors)"),
    (_truncated_weights, "adapter_model.safetensors is not a readable safetensors file"),
    (_garbage_weights, "adapter_model.safetensors is not a readable safetensors file"),
    (_config_not_json, "adapter_config.json is not valid JSON"),
    (_config_a_list, "adapter_config.json should hold a JSON object"),
    (_run_config_not_json, "run_config.json is not valid JSON"),
    (_run_config_settings_not_an_object, "run_config.json has settings that are not a JSON object"),
    (_refused_pickle, "adapter_model.bin is a pickle that holds more than tensors (argparse.Namespace)"),
    (_truncated_pickle, "adapter_model.bin is not a readable PyTorch file"),
]


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("damage, message", ADAPTER_DAMAGE, ids=[d.__name__.strip("_") for d, _ in ADAPTER_DAMAGE])
def test_damaged_adapter_folder(adapter, qa_file, tmp_path, capsys, command, damage, message):
    folder = damaged_copy(adapter, tmp_path)
    damage(folder)
    line = expect_error(capsys, command_line(command, folder, qa_file), message)
    assert "Repo id" not in line
    if damage is _refused_pickle:
        assert "only safetensors files and tensor-only pickles" in line and "weights_only" not in line


def test_tensor_only_pickle_adapter_still_loads(tiny_model, adapter, tmp_path, capsys):
    """A .bin of plain tensors loads (weights_only=True runs no code) and answers as the safetensors one does."""
    folder = damaged_copy(adapter, tmp_path)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    answers = []
    for source in (adapter, folder):
        capsys.readouterr()
        assert main(["generate", "--adapter", str(source), "--dtype", "float32", "--max-new-tokens", "4", PROMPT]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


def test_truncated_base_model_weights(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(_truncated(weights.read_bytes()))
    line = expect_error(capsys, ["generate", "--model", str(model), PROMPT], f"could not load the model in {model}: ")
    assert "incomplete metadata" in line and line.endswith("copy the folder again or re-save it with save_pretrained()")


# ---- generate and eval: devices ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_unknown_device_lists_the_available_ones(adapter, qa_file, capsys, command):
    line = expect_error(capsys, command_line(command, adapter, qa_file, "--device", "tpu9"), "'tpu9' is not")
    assert line.endswith("use one of: " + ", ".join(eetq_lora.models.load.available_devices()))
    assert "cpu" in line


def hide_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cuda_without_a_gpu(adapter, qa_file, capsys, monkeypatch, command):
    hide_gpus(monkeypatch, 0)
    line = expect_error(capsys, command_line(command, adapter, qa_file, "--device", "cuda"), "device 'cuda' is not")
    assert "use one of: cpu" in line


# ---- generate: numeric flags ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e-40"])
def test_unusable_temperature(adapter, qa_file, capsys, value):
    expect_error(capsys, command_line("generate", adapter, qa_file, f"--temperature={value}"), "--temperature")


@pytest.mark.parametrize("value", ["1e30", "-1", str(2**64), "7.5", "seven"])
def test_seed_out_of_range(adapter, qa_file, capsys, value):
    line = expect_error(capsys, command_line("generate", adapter, qa_file, f"--seed={value}"), "--seed must be")
    assert repr(value) in line


def test_seed_range_is_the_one_torch_takes():
    for seed in (0, 2**63, 2**64 - 1):
        assert parse_seed(str(seed)) == seed
        torch.manual_seed(seed)  # the independent reference: torch accepts every seed parse_seed does
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(2**64)


def test_sampling_with_the_largest_seed_works(adapter, capsys):
    argv = ["generate", "--adapter", str(adapter), "--dtype", "float32", "--max-new-tokens", "3"]
    assert main([*argv, "--temperature", "0.7", "--seed", str(2**64 - 1), PROMPT]) == 0
    assert main([*argv, "--temperature", "1e-4", PROMPT]) == 0  # the smallest sampling temperature
    assert "error" not in capsys.readouterr().err


def test_no_debug_variable_leaks_into_these_tests():
    # The one-line assertions above depend on the last-resort handler not re-raising.
    assert os.environ.get("EETQ_LORA_DEBUG", "").strip() in ("", "0")
