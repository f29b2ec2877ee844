"""What an EETQ base cannot do is refused the first time, with a message naming the EETQ layer and the way out."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import eetq_lora
from eetq_lora import EetqLoraLinear
from tests.helpers import tiny_llama


def quantized():
    return eetq_lora.quantize_model(tiny_llama())


def test_target_parameters_on_an_eetq_layer_is_refused_each_time():
    config = LoraConfig(target_modules=[], target_parameters=["q_proj.weight"])
    for _ in range(2):
        model = quantized()
        with pytest.raises(ValueError, match=r"target_parameters reached the EETQ int8 layer .*target_modules="):
            get_peft_model(model, config)
        assert not any(isinstance(m, EetqLoraLinear) for m in model.modules())


def test_modules_to_save_naming_an_eetq_layer_is_refused_before_changing_the_model():
    model = quantized()
    with pytest.raises(ValueError, match=r"modules_to_save names 'v_proj'.*EETQ int8 layer.*modules_to_not_convert"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["v_proj"]))
    assert not any(isinstance(m, EetqLoraLinear) for m in model.modules())
    # A float module (the head) is still a valid modules_to_save.
    peft_model = get_peft_model(quantized(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "lm_head" in n)


def variant_configs():
    import peft

    yield "kasa_config", {"kasa_config": peft.KasaConfig()}
    yield "velora_config", {"velora_config": peft.VeloraConfig()}
    yield "monteclora_config", {"monteclora_config": peft.MontecloraConfig()}
    yield "use_bdlora", {"use_bdlora": peft.BdLoraConfig()}


@pytest.mark.parametrize("name, options", list(variant_configs()), ids=[n for n, _ in variant_configs()])
def test_lora_variants_name_the_eetq_layer_and_the_way_out(name, options):
    try:
        config = LoraConfig(r=4, target_modules=["q_proj"], **options)
    except (TypeError, ValueError) as error:  # a variant whose config needs more than its defaults
        pytest.skip(f"{name} needs settings beyond its defaults: {error}")
    with pytest.raises(ValueError, match=rf"EetqLoraLinear \(.*q_proj\) supports plain LoRA only.*{name}"):
        get_peft_model(quantized(), config)


@pytest.mark.parametrize(
    "options",
    [
        {"use_dora": True},
        *(
            {"init_lora_weights": init}
            for init in ["pissa", "olora", "loftq", "corda", "orthogonal", "lora_ga", "mica"]
        ),
    ],
    ids=lambda options: str(next(iter(options.values()))),
)
def test_dora_and_base_weight_inits_name_the_eetq_layer_and_the_way_out(options):
    config = LoraConfig(r=4, target_modules=["q_proj"])
    # Set after construction: LoraConfig's own checks for some inits need optional packages (scipy).
    for key, value in options.items():
        setattr(config, key, value)
    model = quantized()
    with pytest.raises(
        ValueError, match=r"EetqLoraLinear \(model\.layers\.0\.self_attn\.q_proj\).*modules_to_not_convert"
    ):
        get_peft_model(model, config)


def test_plain_lora_still_builds():
    model = get_peft_model(quantized(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert len([m for m in model.modules() if isinstance(m, EetqLoraLinear)]) == 2
    assert torch.isfinite(model(torch.randint(0, 100, (1, 5))).logits).all()


@pytest.mark.parametrize("dropout", [-0.1, 1.0, float("nan")])
def test_lora_dropout_out_of_range_is_refused(dropout):
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        get_peft_model(quantized(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=dropout))
    with pytest.raises(ValueError, match="lora_dropout"):
        EetqLoraLinear(eetq_lora.EetqLinear(64, 64), "default", r=4, lora_dropout=dropout)
