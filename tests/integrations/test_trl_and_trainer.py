"""The most common fine-tuning recipes, unchanged, on an EETQ model: TRL's SFTTrainer with peft_config,
and transformers' Trainer on a stock peft.get_peft_model; saved adapters reload with identical logits."""

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import eetq_lora
from eetq_lora import EetqLoraLinear
from tests.helpers import CHAT_TEMPLATE, make_model_dir, qa_pairs

pytest.importorskip("datasets", reason="TRL and the datasets package come with the test extra")


@pytest.fixture(scope="module")
def eetq_checkpoint(tmp_path_factory):
    """A tiny chat model (tokenizer with a chat template, built here) saved as an EETQ checkpoint."""
    root = tmp_path_factory.mktemp("recipes")
    float_folder = make_model_dir(root / "float", chat_template=CHAT_TEMPLATE)
    model = eetq_lora.quantize_model(AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32))
    model.save_pretrained(root / "eetq")
    AutoTokenizer.from_pretrained(float_folder).save_pretrained(root / "eetq")
    return root / "eetq"


def chat_rows():
    return [
        {
            "messages": [
                {"role": "system", "content": "answer with the sound"},
                {"role": "user", "content": pair["prompt"]},
                {"role": "assistant", "content": pair["response"]},
            ]
        }
        for pair in qa_pairs()
    ]


def probe_logits(model, tokenizer):
    ids = tokenizer("what does the cow say ?", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_trl_sft_trainer_with_peft_config_all_linear(eetq_checkpoint, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL comes with the test extra")
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(eetq_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(eetq_checkpoint)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=64,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(chat_rows()),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    assert isinstance(trainer.model, PeftModel)
    assert len([m for m in trainer.model.modules() if isinstance(m, EetqLoraLinear)]) == 14
    before = lora_weights(trainer.model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    after = lora_weights(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    trainer.save_model(str(tmp_path / "adapter"))

    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert len([m for m in reloaded.modules() if isinstance(m, EetqLoraLinear)]) == 14
    # TRL keeps a quantized model's adapters in bfloat16 (the QLoRA recipe); PEFT loads them into
    # float32 parameters. The values are the same; in the trainer's dtype so are the logits.
    trained = dict(trainer.model.named_parameters())
    for name, parameter in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(parameter.to(trained[name].dtype), trained[name]), name
            parameter.data = parameter.data.to(trained[name].dtype)
    # SFTConfig's default bf16=True leaves the trained model's forward under bfloat16 autocast.
    assert trainer.args.bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = probe_logits(reloaded, tokenizer).float()
    assert torch.equal(expected, probe_logits(trainer.model, tokenizer))


def test_transformers_trainer_on_a_stock_peft_model(eetq_checkpoint, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(eetq_checkpoint)
    texts = [f"{p['prompt']} {p['response']}" for p in qa_pairs()]
    data = Dataset.from_dict(dict(tokenizer(texts)))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(eetq_checkpoint), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    assert trainer.state.global_step == 3
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(eetq_checkpoint), tmp_path / "adapter")
    assert torch.equal(probe_logits(reloaded, tokenizer), probe_logits(model, tokenizer))
