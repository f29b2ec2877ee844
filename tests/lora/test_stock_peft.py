"""Stock PEFT and transformers entry points take an EETQ model once eetq_lora is imported."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from transformers import AutoModelForCausalLM

import eetq_lora
from eetq_lora import EetqLinear, EetqLoraLinear, mark_eetq_quantized
from eetq_lora.lora import peft_hooks
from tests.helpers import PROJECTIONS, tiny_llama, token_batch


def quantized(seed=0):
    return eetq_lora.quantize_model(tiny_llama(seed=seed, hidden_size=128, intermediate_size=256))


def config(target_modules, **overrides):
    # init_lora_weights=False: B is random, so an adapter that did not load would show in the logits.
    return LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False, **overrides)


def wrapped_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, EetqLoraLinear))


def logits(model):
    with torch.no_grad():
        return model(token_batch()).logits


@pytest.mark.parametrize(
    "targets, count",
    [(["q_proj", "v_proj"], 4), (r".*\.(gate|up)_proj", 4), ("all-linear", 14), (PROJECTIONS, 14)],
)
def test_stock_get_peft_model_wraps_eetq_layers(targets, count):
    torch.manual_seed(3)
    model = get_peft_model(quantized(), config(targets))
    assert len(wrapped_names(model)) == count
    assert not any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # all-linear leaves the head alone
    torch.manual_seed(3)
    ours = eetq_lora.get_peft_model(quantized(), config(targets))
    assert wrapped_names(ours) == wrapped_names(model)
    assert torch.equal(logits(model), logits(ours))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An EETQ checkpoint folder and an adapter trained a step on it (adapter config points at the folder)."""
    root = tmp_path_factory.mktemp("stock")
    base = quantized()
    mark_eetq_quantized(base)
    base.save_pretrained(root / "base")
    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), config("all-linear"))
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    return root, logits(model)


def test_peft_model_from_pretrained_on_a_quantized_base(saved):
    root, expected = saved
    for trainable in (False, True):
        model = PeftModel.from_pretrained(quantized(), root / "adapter", is_trainable=trainable)
        assert len(wrapped_names(model)) == 14
        assert torch.equal(logits(model), expected)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert all(p.requires_grad == trainable for p in lora)


def test_auto_peft_model_and_auto_model_load_the_adapter_folder(saved):
    root, expected = saved
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    auto_peft = AutoPeftModelForCausalLM.from_pretrained(root / "adapter")
    assert len(wrapped_names(auto_peft)) == 14 and torch.equal(logits(auto_peft), expected)
    auto = AutoModelForCausalLM.from_pretrained(root / "adapter")
    assert len(wrapped_names(auto)) == 14 and torch.equal(logits(auto), expected)


def test_transformers_load_adapter_and_inject_adapter_in_model(saved):
    root, expected = saved
    model = quantized()
    model.load_adapter(str(root / "adapter"))
    assert len(wrapped_names(model)) == 14 and torch.equal(logits(model), expected)
    base = quantized()
    base_logits = logits(base)
    injected = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), base)
    assert len(wrapped_names(injected)) == 2
    # PEFT's default init makes B zero: the injected model computes what the base did, through the adapters.
    assert torch.equal(logits(injected), base_logits)


def test_peft_add_adapter_reaches_layers_not_yet_wrapped():
    model = get_peft_model(quantized(), config(["q_proj"]))
    model.add_adapter("second", config(["down_proj"]))
    second = [name for name, m in model.named_modules() if isinstance(m, EetqLoraLinear) and "second" in m.lora_A]
    assert len(second) == 2 and all(name.endswith("down_proj") for name in second)


def test_merge_keeps_the_exact_message_and_points_to_export_merged():
    model = get_peft_model(quantized(), config(["q_proj"]))
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(AttributeError) as info:
            call()
        assert str(info.value) == "Merging LoRA layers is not supported for Eetq layers."
        assert any("eetq_lora.export_merged" in note for note in getattr(info.value, "__notes__", []))


def test_a_peft_that_moved_the_hooked_names_fails_loudly(monkeypatch):
    import peft.tuners.lora.model as lora_model

    monkeypatch.delattr(lora_model, "dispatch_eetq")
    with pytest.raises(peft_hooks.PeftCompatibilityError, match=r"dispatch_eetq is gone.*peft>=0.21,<0.22"):
        peft_hooks.install_peft_hooks()


def test_a_peft_without_the_all_linear_function_fails_loudly(monkeypatch):
    import peft.tuners.tuners_utils as tuners_utils

    monkeypatch.delattr(tuners_utils, "_maybe_include_all_linear_layers")
    with pytest.raises(peft_hooks.PeftCompatibilityError, match=r"_maybe_include_all_linear_layers is gone"):
        peft_hooks.install_peft_hooks()


def test_a_peft_that_expands_all_linear_elsewhere_fails_loudly(monkeypatch):
    # The function still exists, but inject_adapter stopped calling it: the hook would never run.
    import peft.tuners.tuners_utils as tuners_utils

    def inject_adapter(self, model, adapter_name, **kwargs):
        return None

    monkeypatch.setattr(tuners_utils.BaseTuner, "inject_adapter", inject_adapter)
    with pytest.raises(peft_hooks.PeftCompatibilityError, match=r"inject_adapter no longer calls"):
        peft_hooks.install_peft_hooks()


def test_a_peft_whose_factory_stops_using_the_hook_fails_loudly(monkeypatch):
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "_create_new_module", staticmethod(lambda *args, **kwargs: torch.nn.Identity()))
    with pytest.raises(peft_hooks.PeftCompatibilityError, match="Identity on an EETQ layer"):
        peft_hooks.install_peft_hooks()


def test_hooks_are_installed_once():
    import peft.tuners.tuners_utils as tuners_utils

    first = tuners_utils._maybe_include_all_linear_layers
    peft_hooks.install_peft_hooks()
    assert tuners_utils._maybe_include_all_linear_layers is first
    assert EetqLinear in peft_hooks.eetq_layer_classes()
