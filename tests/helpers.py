"""Tiny models built from config, a word-level tokenizer and prompt/response pairs (no downloads) for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128
# A Llama decoder layer's linear layers: attention's four, then the MLP's three.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# The sizes of every tiny test model, whatever its family.
TINY_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(TINY_SIZES, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The same random weights for the same seed, so a model can be rebuilt identically."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def token_batch(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def dequantized_twin(quantized: torch.nn.Module, seed: int = 0) -> LlamaForCausalLM:
    """A float tiny Llama whose linear weights are the dequantized weights of ``quantized``'s EETQ layers."""
    from eetq_lora import EetqLinear

    twin = tiny_llama(seed=seed)
    for name, module in quantized.named_modules():
        if isinstance(module, EetqLinear):
            float_name = name.removesuffix(".base_layer").removesuffix(".quant_linear_module")
            twin.get_submodule(float_name).weight.data = module.dequantize(torch.float32)
    return twin


# --- a tiny Llama saved with a word-level tokenizer, and the prompt/response pairs it is trained on ---

ANIMALS = [
    "cat",
    "dog",
    "cow",
    "fox",
    "owl",
    "bee",
    "ant",
    "elk",
    "yak",
    "emu",
    "rat",
    "bat",
    "eel",
    "hen",
    "pig",
    "ram",
]
SOUNDS = [
    "meow",
    "woof",
    "moo",
    "yip",
    "hoot",
    "buzz",
    "tick",
    "bugle",
    "grunt",
    "boom",
    "squeak",
    "click",
    "zap",
    "cluck",
    "oink",
    "baa",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def qa_pairs() -> list[dict[str, str]]:
    """48 prompt/response pairs with a learnable pattern (what an animal says)."""
    pairs = []
    for animal, sound in zip(ANIMALS, SOUNDS, strict=True):
        pairs.append({"prompt": f"what does the {animal} say ?", "response": f"the {animal} says {sound} ."})
        pairs.append({"prompt": f"which sound does a {animal} make ?", "response": f"a {animal} makes {sound} ."})
        pairs.append({"prompt": f"tell me the {animal} sound", "response": f"{sound} is the {animal} sound ."})
    return pairs


def make_tokenizer(chat_template: str | None = None):
    """A word-level tokenizer trained in memory on the fixture texts (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p["prompt"] + " " + p["response"] for p in qa_pairs()]
    texts += ["Question : Answer : user assistant system < > a plain line of text for the model to learn"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>"])
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_model_dir(folder: Path, chat_template: str | None = None, seed: int = 0) -> Path:
    """Save in ``folder`` a tiny Llama (seeded by ``seed``) with the word-level tokenizer; returns ``folder``."""
    tokenizer = make_tokenizer(chat_template)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
