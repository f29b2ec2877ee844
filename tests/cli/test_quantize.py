"""``eetq-lora quantize``: streaming checkpoint quantization, its output and its errors."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, EetqConfig

import eetq_lora.quant.convert as convert_module
from eetq_lora import EetqLinear, quantize_model, quantize_weight
from eetq_lora.cli.common import usable_cpus
from eetq_lora.cli.main import build_parser, main
from eetq_lora.format.layout import pack_weight
from tests.format.helpers import sm70_by_steps, sm75_by_gather, stored_bytes
from tests.helpers import PROJECTIONS, tiny_llama, token_batch
from tests.quant.helpers import float_folder

WIDE = dict(hidden_size=128, intermediate_size=256)


def run_cli(*args) -> int:
    return main(["quantize", *map(str, args), "--no-progress"])


def read_folder(path):
    tensors, metadata = {}, {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
        with safe_open(str(file), framework="pt") as handle:
            metadata[file.name] = handle.metadata()
    return tensors, metadata


def logits(model):
    with torch.no_grad():
        return model(token_batch()).logits


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_quantize_writes_a_loadable_eetq_folder(tmp_path, capsys):
    src, out = tmp_path / "float", tmp_path / "int8"
    model = float_folder(src, **WIDE)
    assert run_cli(src, out) == 0
    printed = capsys.readouterr().out
    assert "parameters: " in printed and "bytes: " in printed and "time: " in printed and "parameters/s" in printed
    assert f"load it: import eetq_lora, then AutoModelForCausalLM.from_pretrained({str(out)!r})" in printed

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "eetq",
        "weights": "int8",
        "modules_to_not_convert": ["lm_head"],
    }
    tensors, metadata = read_folder(out)
    assert metadata["model.safetensors"]["eetq_layout"] == "sm75"
    source = model.state_dict()
    for layer in range(2):
        for name in PROJECTIONS:
            group = "self_attn" if name in PROJECTIONS[:4] else "mlp"
            key = f"model.layers.{layer}.{group}.{name}.weight"
            q, scales = quantize_weight(source[key])
            assert torch.equal(tensors[key], pack_weight(q, "sm75" if q.shape[1] % 64 == 0 else "plain")), key
            assert torch.equal(tensors[key + "_scales"], scales)
    q, _ = quantize_weight(source["model.layers.1.mlp.up_proj.weight"])
    assert stored_bytes(tensors["model.layers.1.mlp.up_proj.weight"]) == sm75_by_gather(q)
    assert torch.equal(tensors["lm_head.weight"], source["lm_head.weight"])
    assert torch.equal(tensors["model.norm.weight"], source["model.norm.weight"])

    loaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(src, quantization_config=EetqConfig("int8"))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, EetqLinear)
    assert torch.equal(logits(loaded), logits(reference))
    assert torch.equal(logits(loaded), logits(quantize_model(tiny_llama(**WIDE))))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # like mkdir, not a private temp folder
    assert leftovers(tmp_path, "int8") == []


def test_non_weight_files_are_copied_weights_are_not(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "README.md",
    ):
        (src / name).write_text(f"{name} contents")
    torch.save({}, src / "pytorch_model.bin")
    (src / "original").mkdir()
    (src / "original" / "consolidated.pth").write_bytes(b"x")
    assert run_cli(src, out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "README.md",
        ]
    )
    assert (out / "tokenizer.json").read_text() == "tokenizer.json contents"


def test_sharded_checkpoint(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src, max_shard_size="300KB", **WIDE)
    assert (src / "model.safetensors.index.json").is_file()
    assert run_cli(src, out) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for key, shard in index["weight_map"].items():
        if key.endswith("_scales"):
            assert index["weight_map"][key.removesuffix("_scales")] == shard
    tensors, _ = read_folder(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(loaded), logits(quantize_model(tiny_llama(**WIDE))))


@pytest.mark.parametrize("layout, reference", [("sm70", sm70_by_steps), ("plain", None)])
def test_other_layouts(tmp_path, capsys, layout, reference):
    src, out = tmp_path / "float", tmp_path / "int8"
    model = float_folder(src, **WIDE)
    assert run_cli(src, out, "--layout", layout) == 0
    assert "note:" in capsys.readouterr().out
    tensors, metadata = read_folder(out)
    assert metadata["model.safetensors"]["eetq_layout"] == layout
    q, _ = quantize_weight(model.state_dict()["model.layers.0.mlp.down_proj.weight"])
    stored = tensors["model.layers.0.mlp.down_proj.weight"]
    if reference is None:
        assert torch.equal(stored, q)
    else:
        assert stored_bytes(stored) == reference(q)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(loaded), logits(quantize_model(tiny_llama(**WIDE))))


def test_skip_replaces_the_default(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src, **WIDE)
    assert run_cli(src, out, "--skip", "lm_head", "--skip", "down_proj") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head", "down_proj"]
    tensors, _ = read_folder(out)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.down_proj.weight_scales" not in tensors
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    expected = quantize_model(tiny_llama(**WIDE), modules_to_not_convert=["lm_head", "down_proj"])
    assert torch.equal(logits(loaded), logits(expected))


def test_tied_embeddings_stay_float(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src, tie_word_embeddings=True, **WIDE)
    assert run_cli(src, out, "--skip", "o_proj") == 0  # lm_head not named: it is tied, so it stays float anyway
    skips = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "lm_head" in skips and "o_proj" in skips
    tensors, _ = read_folder(out)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight_scales" not in tensors
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    expected = quantize_model(
        tiny_llama(tie_word_embeddings=True, **WIDE), modules_to_not_convert=["lm_head", "o_proj"]
    )
    assert torch.equal(logits(loaded), logits(expected))


def test_overwrite_replaces_an_existing_folder(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src)
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run_cli(src, out, "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path, "int8") == []


def test_worker_count_changes_nothing_but_speed(tmp_path):
    src = tmp_path / "float"
    float_folder(src, max_shard_size="300KB", **WIDE)
    before = torch.get_num_threads()
    assert run_cli(src, tmp_path / "one", "--threads", "1") == 0
    # As many workers as the machine allows (at least two where it has them).
    assert run_cli(src, tmp_path / "three", "--threads", str(usable_cpus())) == 0
    assert torch.get_num_threads() == before
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "three").iterdir())
    # safetensors orders its metadata map arbitrarily, so shards are compared by content.
    one, one_metadata = read_folder(tmp_path / "one")
    three, three_metadata = read_folder(tmp_path / "three")
    assert one_metadata == three_metadata and one.keys() == three.keys()
    assert all(torch.equal(one[key], three[key]) and one[key].dtype == three[key].dtype for key in one)
    for name in names:
        if not name.endswith(".safetensors"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


def test_progress_bar_goes_to_stderr_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    src = tmp_path / "float"
    float_folder(src)
    assert main(["quantize", str(src), str(tmp_path / "piped")]) == 0
    assert "quantizing" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["quantize", str(src), str(tmp_path / "int8")]) == 0
    assert "quantizing" in capsys.readouterr().err
    assert main(["quantize", "--no-progress", str(src), str(tmp_path / "quiet")]) == 0
    assert "quantizing" not in capsys.readouterr().err


# ---- failures ------------------------------------------------------------------------------


def expect_input_error(capsys, *args, message: str) -> None:
    capsys.readouterr()  # drop what setting up the folders printed
    assert run_cli(*args) == 1  # bad input: the same exit code as every other subcommand
    err = capsys.readouterr().err
    assert err.startswith("eetq-lora quantize: error: ") and message in err, err


def test_missing_source(tmp_path, capsys):
    expect_input_error(capsys, tmp_path / "nope", tmp_path / "out", message="does not exist")
    assert not (tmp_path / "out").exists()


def test_source_without_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    expect_input_error(capsys, tmp_path / "src", tmp_path / "out", message="no config.json")


def test_source_without_safetensors(tmp_path, capsys):
    src = tmp_path / "src"
    model = tiny_llama()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    expect_input_error(capsys, src, tmp_path / "out", message="no model.safetensors")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_untouched(tmp_path, capsys):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_input_error(capsys, src, out, message="already exists; choose another output folder or pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_inside_source_is_refused(tmp_path, capsys):
    src = tmp_path / "float"
    float_folder(src)
    expect_input_error(capsys, src, src / "int8", message="must be outside the source folder")
    expect_input_error(capsys, src, src, "--overwrite", message="must be outside the source folder")


def test_already_quantized_source(tmp_path, capsys):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src)
    assert run_cli(src, out) == 0
    expect_input_error(capsys, out, tmp_path / "again", message="already quantized (quant_method 'eetq')")


def test_tensor_names_that_do_not_match_the_model(tmp_path, capsys):
    src = tmp_path / "float"
    float_folder(src)
    tensors = load_file(src / "model.safetensors")
    save_file({key.replace("model.", "transformer.", 1): t for key, t in tensors.items()}, src / "model.safetensors")
    expect_input_error(capsys, src, tmp_path / "out", message="tensor names differ")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_bad_threads_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tmp_path), str(tmp_path / "out"), "--threads", "0"])
    assert info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_unknown_layout_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tmp_path), str(tmp_path / "o"), "--layout", "sm90"])
    assert info.value.code == 2


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "float", tmp_path / "int8"
    float_folder(src)
    calls = []

    def failing(weight, name=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return quantize_weight(weight, name=name)

    monkeypatch.setattr(convert_module, "quantize_weight", failing)
    monkeypatch.delenv("EETQ_LORA_DEBUG", raising=False)
    capsys.readouterr()
    # An unexpected error is one line and exit code 1, like every other subcommand's.
    assert run_cli(src, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("eetq-lora quantize: error: RuntimeError: disk on fire") and err.count("\n") == 1, err
    assert not out.exists() and leftovers(tmp_path, "int8") == []
    # With --overwrite the old folder survives a failed run.
    out.mkdir()
    (out / "old.txt").write_text("old")
    calls.clear()
    assert run_cli(src, out, "--overwrite") == 1
    assert [p.name for p in out.iterdir()] == ["old.txt"] and leftovers(tmp_path, "int8") == []


def test_registered_in_the_cli():
    parser = build_parser()
    args = parser.parse_args(["quantize", "a", "b", "--skip", "lm_head", "embed", "--layout", "sm70"])
    assert args.func.__module__ == "eetq_lora.cli.quantize"
    assert args.skip == ["lm_head", "embed"] and args.layout == "sm70" and not args.overwrite
