"""quantize_checkpoint and linear_weight_names: a float safetensors folder quantized tensor by tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from eetq_lora import quantize_weight
from eetq_lora.errors import UserError
from eetq_lora.format.layout import pack_weight
from eetq_lora.quant import convert
from eetq_lora.quant.convert import CheckpointError, ConversionReport, linear_weight_names, quantize_checkpoint
from tests.helpers import PROJECTIONS, tiny_llama
from tests.quant.helpers import float_folder


def linear_weights(*groups: str) -> set[str]:
    """The weight names of the tiny Llama's linear layers, both decoder layers."""
    return {
        f"model.layers.{i}.{'self_attn' if n in PROJECTIONS[:4] else 'mlp'}.{n}.weight"
        for i in range(2)
        for n in PROJECTIONS
        if not groups or n in groups
    }


def test_linear_weights_come_from_the_architecture(tmp_path):
    float_folder(tmp_path)
    names, skips = linear_weight_names(tmp_path)
    expected = {
        f"model.layers.{i}.{g}.{n}.weight"
        for i in range(2)
        for g, n in [("self_attn", n) for n in PROJECTIONS[:4]] + [("mlp", n) for n in PROJECTIONS[4:]]
    }
    assert names == expected and skips == ["lm_head"]


def test_the_skip_list_replaces_the_default_and_matches_module_names(tmp_path):
    float_folder(tmp_path)
    names, skips = linear_weight_names(tmp_path, ["down_proj", r"model\.layers\.1\.self_attn"])
    kept = {n for n in linear_weights() if "down_proj" not in n and "layers.1.self_attn" not in n}
    assert names == kept | {"lm_head.weight"}
    assert skips == ["down_proj", r"model\.layers\.1\.self_attn"]


def test_tied_weights_are_added_to_the_skip_list(tmp_path):
    float_folder(tmp_path, tie_word_embeddings=True)
    names, skips = linear_weight_names(tmp_path, ())
    assert names == linear_weights()
    assert skips == ["lm_head", "model.embed_tokens"]


def test_skip_patterns_must_be_strings(tmp_path):
    float_folder(tmp_path)
    with pytest.raises(CheckpointError) as error:
        linear_weight_names(tmp_path, ["lm_head", 3])
    assert str(error.value) == "modules to keep in float must be names or patterns (strings), got 3"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_checkpoint_quantizes_each_linear_weight_and_copies_the_rest(tmp_path, dtype):
    src, out = tmp_path / "float", tmp_path / "int8"
    tiny_llama().to(dtype).save_pretrained(src)
    source = load_file(src / "model.safetensors")
    assert {t.dtype for t in source.values()} == {dtype}
    report = quantize_checkpoint(src, out, layout="plain", threads=1, progress=False)

    tensors = load_file(out / "model.safetensors")
    quantized = linear_weights()
    assert set(tensors) == set(source) | {f"{key}_scales" for key in quantized}
    for key, tensor in source.items():
        if key in quantized:
            q, scales = quantize_weight(tensor)
            assert torch.equal(tensors[key], q) and torch.equal(tensors[key + "_scales"], scales), key
        else:
            assert tensors[key].dtype == dtype and torch.equal(tensors[key], tensor), key
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "eetq",
        "weights": "int8",
        "modules_to_not_convert": ["lm_head"],
    }

    assert report.parameters == sum(t.numel() for t in source.values())
    assert report.quantized_parameters == sum(source[key].numel() for key in quantized)
    assert report.quantized_layers == len(quantized) == 14
    assert report.bytes_before == sum(t.numel() * t.element_size() for t in source.values())
    assert report.bytes_after == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report.layout == "plain" and report.modules_to_not_convert == ["lm_head"]
    assert report.parameters_per_second == report.parameters / report.seconds


def test_the_default_layout_packs_multiples_of_64_and_keeps_other_sizes_plain(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int8"
    model = float_folder(src, intermediate_size=96)
    report = quantize_checkpoint(src, out, progress=False)
    assert report.layout == "sm75"
    tensors, source = load_file(out / "model.safetensors"), model.state_dict()
    for key in linear_weights("q_proj", "up_proj", "down_proj"):
        q, _ = quantize_weight(source[key])
        fits = q.shape[0] % 64 == 0 and q.shape[1] % 64 == 0
        assert torch.equal(tensors[key], pack_weight(q, "sm75" if fits else "plain")), key
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (64, 96)  # plain: [in, out]


def test_checkpoint_errors_are_user_errors_and_value_errors(tmp_path):
    with pytest.raises(CheckpointError) as error:
        quantize_checkpoint(tmp_path / "missing", tmp_path / "out", progress=False)
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)
    assert str(error.value) == f"source folder {tmp_path / 'missing'} does not exist (or is not a folder)"
    assert not (tmp_path / "out").exists()


def test_parameters_per_second_of_an_instant_conversion_is_infinite():
    report = ConversionReport(10, 8, 1, 40, 12, 0.0, "plain", ["lm_head"])
    assert report.parameters_per_second == float("inf")
    assert ConversionReport(10, 8, 1, 40, 12, 2.0, "plain", []).parameters_per_second == 5.0


@pytest.mark.parametrize("threads", [1, 2])
def test_weights_waiting_to_be_quantized_stay_bounded(tmp_path, monkeypatch, threads):
    # "streamed": reading runs ahead of quantizing by at most 2 x threads weights, however many
    # the checkpoint holds, so memory stays near one shard's output.
    src = tmp_path / "float"
    tiny_llama().save_pretrained(src)
    waiting, real_finish = [], convert._finish_oldest
    monkeypatch.setattr(
        convert, "_finish_oldest", lambda queue, *a: waiting.append(len(queue)) or real_finish(queue, *a)
    )
    report = quantize_checkpoint(src, tmp_path / "int8", threads=threads, progress=False)
    assert report.quantized_layers == len(linear_weights()) > 2 * threads + 1
    assert max(waiting) == 2 * threads + 1


def test_a_module_to_keep_in_float_that_matches_nothing_is_refused(tmp_path):
    # "--skip nothere" must not quietly quantize the head the user meant to keep.
    src = tmp_path / "float"
    tiny_llama().save_pretrained(src)
    with pytest.raises(CheckpointError, match=r"\['nothere'\] match no module of the model"):
        quantize_checkpoint(src, tmp_path / "int8", modules_to_not_convert=["nothere"], progress=False)
    assert not (tmp_path / "int8").exists()
    report = quantize_checkpoint(
        src, tmp_path / "int8", modules_to_not_convert=["lm_head", "down_proj"], progress=False
    )
    assert report.quantized_layers == len(linear_weights()) - 2
