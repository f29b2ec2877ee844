"""transformers loads and saves EETQ checkpoints through eetq_lora, on CPU, without the network."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, EetqConfig
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizer_eetq import EetqHfQuantizer
from transformers.utils import logging as transformers_logging

import eetq_lora
from eetq_lora import EetqLinear, mark_eetq_quantized, quantize_model, quantize_weight, set_checkpoint_layout
from eetq_lora.format.layout import pack_weight
from eetq_lora.integrations import EetqLoraHfQuantizer, is_transformers_enabled, read_checkpoint_layout
from tests.format.helpers import sm70_by_steps, sm75_by_gather, stored_bytes
from tests.helpers import tiny_llama, token_batch

WIDE = dict(hidden_size=128, intermediate_size=256)  # every projection fits EETQ's 64-multiples


@pytest.fixture(autouse=True)
def _enabled():
    eetq_lora.enable_transformers()
    yield
    eetq_lora.enable_transformers()  # back to the default layout, registered


def save_float(path, dtype=torch.float32, seed=0, **overrides):
    model = tiny_llama(seed=seed, **overrides).to(dtype)
    model.save_pretrained(path)
    return model


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_batch() if ids is None else ids).logits


def quantized_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, EetqLinear)}


def assert_same_quantized(a, b):
    layers_a, layers_b = quantized_layers(a), quantized_layers(b)
    assert layers_a.keys() == layers_b.keys() and layers_a
    for name, layer in layers_a.items():
        other = layers_b[name]
        assert torch.equal(layer.weight, other.weight), name
        assert torch.equal(layer.weight_scales, other.weight_scales), name
        assert (layer.bias is None) == (other.bias is None)
        if layer.bias is not None:
            assert torch.equal(layer.bias, other.bias), name


def read_shards(path):
    tensors, metadata = {}, {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
        with safe_open(str(file), framework="pt") as handle:
            metadata.update(handle.metadata() or {})
    return tensors, metadata


# ---- registration ---------------------------------------------------------------------------


def test_import_registers_and_enable_is_idempotent():
    assert AUTO_QUANTIZER_MAPPING["eetq"] is EetqLoraHfQuantizer
    eetq_lora.enable_transformers()
    eetq_lora.enable_transformers()
    assert AUTO_QUANTIZER_MAPPING["eetq"] is EetqLoraHfQuantizer and is_transformers_enabled()
    eetq_lora.disable_transformers()
    assert AUTO_QUANTIZER_MAPPING["eetq"] is EetqHfQuantizer and not is_transformers_enabled()
    eetq_lora.disable_transformers()
    assert AUTO_QUANTIZER_MAPPING["eetq"] is EetqHfQuantizer
    eetq_lora.enable_transformers()
    assert AUTO_QUANTIZER_MAPPING["eetq"] is EetqLoraHfQuantizer


def test_enable_rejects_unknown_default_layout():
    with pytest.raises(ValueError, match="unknown EETQ checkpoint layout 'sm90'"):
        eetq_lora.enable_transformers(default_layout="sm90")


# ---- quantize on load -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [WIDE, {}], ids=["wide", "narrow-kv"])
def test_float_checkpoint_with_eetq_config_matches_quantize_model(tmp_path, overrides):
    save_float(tmp_path, **overrides)
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=EetqConfig("int8"))
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert type(on_load.lm_head) is nn.Linear
    assert len(quantized_layers(on_load)) == 14  # 7 projections x 2 layers
    assert_same_quantized(on_load, reference)
    assert torch.equal(logits(on_load), logits(reference))


def test_float16_model_with_biases(tmp_path):
    save_float(tmp_path, dtype=torch.float16, attention_bias=True, mlp_bias=True, **WIDE)
    on_load = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=EetqConfig("int8"), dtype=torch.float16
    )
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16))
    layer = on_load.model.layers[0].self_attn.q_proj
    assert layer.bias.dtype == torch.float16 and layer.weight_scales.dtype == torch.float16
    assert_same_quantized(on_load, reference)
    assert torch.equal(logits(on_load), logits(reference))
    on_load.save_pretrained(tmp_path / "q")
    tensors, _ = read_shards(tmp_path / "q")
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16


def test_modules_to_not_convert(tmp_path):
    save_float(tmp_path, **WIDE)
    config = EetqConfig("int8", modules_to_not_convert=["lm_head", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, EetqLinear)
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert sorted(saved["modules_to_not_convert"]) == ["down_proj", "lm_head"]
    tensors, _ = read_shards(tmp_path / "q")
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(reloaded.model.layers[1].mlp.down_proj) is nn.Linear
    assert torch.equal(logits(reloaded), logits(model))


# ---- save ----------------------------------------------------------------------------------


def test_save_writes_the_stock_eetq_format(tmp_path):
    save_float(tmp_path, **WIDE)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=EetqConfig("int8"))
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "eetq"
    assert config["quantization_config"]["weights"] == "int8"
    tensors, metadata = read_shards(tmp_path / "q")
    assert metadata["eetq_layout"] == "sm75"
    for name, layer in quantized_layers(model).items():
        stored, scales = tensors[f"{name}.weight"], tensors[f"{name}.weight_scales"]
        assert stored.dtype == torch.int8 and stored.shape == (layer.in_features, layer.out_features)
        assert scales.dtype == torch.float16 and scales.shape == (layer.out_features,)
        assert torch.equal(stored, pack_weight(layer.weight, "sm75")), name
        assert torch.equal(scales, layer.weight_scales)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert stored_bytes(tensors["model.layers.0.self_attn.q_proj.weight"]) == sm75_by_gather(q_proj.weight)
    assert tensors["lm_head.weight"].dtype == torch.float32
    # The in-memory weights stay plain, and nothing is saved twice.
    assert not any(".base_layer." in key or "quant_linear_module" in key for key in tensors)


@pytest.mark.parametrize("overrides", [WIDE, {}], ids=["wide", "narrow-kv"])
def test_quantize_save_load_gives_identical_logits(tmp_path, overrides):
    save_float(tmp_path, **overrides)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=EetqConfig("int8"))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.hf_quantizer.pre_quantized and isinstance(reloaded.hf_quantizer, EetqLoraHfQuantizer)
    assert_same_quantized(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))


def test_quantize_model_then_mark_then_save(tmp_path):
    model = quantize_model(tiny_llama(**WIDE))
    mark_eetq_quantized(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == [
        "lm_head"
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_quantized(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))


def test_mark_needs_a_quantized_model():
    with pytest.raises(ValueError, match="no EetqLinear layer.*quantize_model"):
        mark_eetq_quantized(tiny_llama())


# ---- load a checkpoint written elsewhere ----------------------------------------------------


def write_eetq_checkpoint(path, model, stored_bytes_of, metadata=None):
    """An EETQ checkpoint the way stock EETQ writes it, built with the reference byte layouts."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": ["lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, tensor in model.state_dict().items():
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and kind == "weight" and module_name != "lm_head":
            q, scales = quantize_weight(tensor)
            in_features, out_features = q.shape
            if in_features % 64 == 0 and out_features % 64 == 0:
                data = torch.tensor(stored_bytes_of(q), dtype=torch.uint8).view(torch.int8).reshape(q.shape)
            else:
                data = q
            tensors[name], tensors[name + "_scales"] = data, scales
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, path / "model.safetensors", metadata=metadata)


def test_loads_a_stock_eetq_checkpoint_as_stored(tmp_path):
    float_model = tiny_llama()
    write_eetq_checkpoint(tmp_path, float_model, sm75_by_gather, metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reference = quantize_model(tiny_llama())
    assert_same_quantized(loaded, reference)
    assert torch.equal(logits(loaded), logits(reference))
    assert all(layer.checkpoint_layout == "sm75" for layer in quantized_layers(loaded).values())


def test_default_layout_for_checkpoints_that_do_not_say(tmp_path):
    write_eetq_checkpoint(tmp_path, tiny_llama(**WIDE), sm70_by_steps)
    reference = quantize_model(tiny_llama(**WIDE))
    assert read_checkpoint_layout([tmp_path / "model.safetensors"]) == "sm75"
    misread = AutoModelForCausalLM.from_pretrained(tmp_path)  # read as sm75: other bytes
    assert not torch.equal(misread.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)
    eetq_lora.enable_transformers(default_layout="sm70")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_quantized(loaded, reference)


def test_layout_metadata_round_trip(tmp_path):
    save_float(tmp_path, **WIDE)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=EetqConfig("int8"))
    set_checkpoint_layout(model, "sm70")
    model.save_pretrained(tmp_path / "q")
    tensors, metadata = read_shards(tmp_path / "q")
    assert metadata["eetq_layout"] == "sm70"
    up = model.model.layers[0].mlp.up_proj
    assert stored_bytes(tensors["model.layers.0.mlp.up_proj.weight"]) == sm70_by_steps(up.weight)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(layer.checkpoint_layout == "sm70" for layer in quantized_layers(reloaded).values())
    assert_same_quantized(model, reloaded)


def test_mixed_layouts_refuse_to_save(tmp_path):
    save_float(tmp_path, **WIDE)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=EetqConfig("int8"))
    model.model.layers[0].mlp.up_proj.checkpoint_layout = "plain"
    with pytest.raises(ValueError, match="different checkpoint layouts.*set_checkpoint_layout"):
        model.save_pretrained(tmp_path / "q")


def test_shards_that_disagree_on_layout(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "a.safetensors", metadata={"eetq_layout": "sm75"})
    save_file({"b": torch.zeros(1)}, tmp_path / "b.safetensors", metadata={"eetq_layout": "plain"})
    with pytest.raises(ValueError, match="disagree"):
        read_checkpoint_layout([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    save_file({"c": torch.zeros(1)}, tmp_path / "c.safetensors", metadata={"eetq_layout": "sm99"})
    with pytest.raises(ValueError, match="unknown EETQ checkpoint layout 'sm99'"):
        read_checkpoint_layout([tmp_path / "c.safetensors"])


# ---- broken checkpoints ---------------------------------------------------------------------


def quantized_checkpoint(tmp_path):
    save_float(tmp_path / "float", **WIDE)
    AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=EetqConfig("int8")).save_pretrained(
        tmp_path / "q"
    )
    return tmp_path / "q", tmp_path / "q" / "model.safetensors"


def test_missing_scales_is_a_clear_error(tmp_path):
    path, file = quantized_checkpoint(tmp_path)
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.gate_proj.weight_scales"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 int8 tensor.*model\.layers\.1\.mlp\.gate_proj\.weight_scales"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("shape", [(128, 256), (256, 128)], ids=["same-shape", "nn.Linear-shape"])
def test_float_weight_where_int8_is_expected_is_an_error(tmp_path, caplog, shape):
    path, file = quantized_checkpoint(tmp_path)
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.ones(shape)
    save_file(tensors, file, metadata={"format": "pt"})
    # transformers raises after logging a load report that carries our message.
    transformers_logging.enable_propagation()
    try:
        with pytest.raises(RuntimeError, match="conversion"):
            AutoModelForCausalLM.from_pretrained(path)
    finally:
        transformers_logging.disable_propagation()
    assert (
        "model.layers.0.mlp.up_proj.weight: an EETQ checkpoint stores int8 [in_features, out_features]" in caplog.text
    )
    assert f"got torch.float32 of shape {list(shape)}" in caplog.text


@pytest.mark.parametrize(
    "device_map",
    [{"model.layers.0": 0, "model.layers.1": "cpu"}, {"model": "cuda:0", "lm_head": torch.device("cpu")}],
)
def test_cpu_offload_next_to_a_gpu_is_refused(device_map):
    # accelerate would offload the CPU part from model.state_dict(), whose int8 weights are in the
    # EETQ checkpoint layout, and put those bytes back into the layers as they are.
    quantizer = EetqLoraHfQuantizer(EetqConfig("int8"))
    with pytest.raises(ValueError, match=r"offloaded to CPU next to a GPU.*device_map='cpu'"):
        quantizer.validate_environment(device_map=device_map)


@pytest.mark.parametrize("device_map", [{"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}, {"model": 0, "lm_head": 1}])
def test_a_device_map_on_one_kind_of_device_is_accepted(device_map):
    EetqLoraHfQuantizer(EetqConfig("int8")).validate_environment(device_map=device_map)


def test_disk_offload_is_refused():
    quantizer = EetqLoraHfQuantizer(EetqConfig("int8"), pre_quantized=True)
    with pytest.raises(ValueError, match="disk"):
        quantizer.validate_environment(device_map={"model": "cpu", "lm_head": "disk"})
    quantizer.validate_environment(device_map={"": "cpu"})
    quantizer.validate_environment(device_map=None)


# ---- the rest ---------------------------------------------------------------------------------


def test_dequantize_gives_back_float_linears(tmp_path):
    save_float(tmp_path, **WIDE)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=EetqConfig("int8"))
    expected = {name: layer.dequantize(torch.float32) for name, layer in quantized_layers(model).items()}
    model.dequantize()
    assert not quantized_layers(model) and not getattr(model, "is_quantized", False)
    for name, weight in expected.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and torch.equal(linear.weight, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_follows_the_models_dtype_after_a_cast(tmp_path, dtype):
    # config.dtype is missing after quantize_model and stale after .to(): the layers must come back
    # in the dtype the rest of the model has, or its forward mixes dtypes.
    model = eetq_lora.quantize_model(tiny_llama()).to(dtype)
    model.config.dtype = torch.float32 if dtype == torch.bfloat16 else None
    model.dequantize()
    assert not quantized_layers(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=token_batch()).logits).all()


def test_a_tied_head_stays_float_when_quantizing_on_the_fly(tmp_path):
    # transformers ties the head to the embeddings after loading: an int8 head would receive the
    # embedding's float matrix and no scales.
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path)
    config = EetqConfig("int8", modules_to_not_convert=[])
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    expected = eetq_lora.quantize_model(tiny_llama(tie_word_embeddings=True), modules_to_not_convert=["lm_head"])
    assert torch.equal(logits(model), logits(expected))


@pytest.mark.parametrize("bias_value", [0.5, 1e5])
def test_quantize_model_keeps_a_bias_in_its_layers_dtype(bias_value):
    # A float16 bias would round an fp32 one, and overflow past 65504.
    model = tiny_llama(attention_bias=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.fill_(bias_value)
    eetq_lora.quantize_model(model)
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert bias.dtype == torch.float32 and torch.all(bias == bias_value)


def test_quantize_model_refuses_a_model_with_adapters():
    peft_model = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match=r"already has PEFT adapters.*get_peft_model\(quantize_model\(model\), config\)"
    ):
        eetq_lora.quantize_model(peft_model)
    assert all(type(m.lora_A["default"]) is nn.Linear for m in peft_model.modules() if hasattr(m, "lora_A"))


def test_nothing_touches_the_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    save_float(tmp_path, **WIDE)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=EetqConfig("int8"))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(reloaded), logits(model))
