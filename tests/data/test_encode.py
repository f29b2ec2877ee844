"""Tokenization with loss labels: only assistant turns are learned, with the chat template or the plain format."""

from __future__ import annotations

import json

import pytest
import torch

from eetq_lora.data import (
    IGNORE_INDEX,
    Example,
    Message,
    PromptFormat,
    collate,
    encode_examples,
    load_file,
    supervised_tokens,
)
from eetq_lora.errors import DataError
from tests.data.helpers import write
from tests.helpers import CHAT_TEMPLATE, make_tokenizer

from .conftest import SYSTEM_CHAT

# CHAT_TEMPLATE with the assistant's part marked, so that transformers itself can say which tokens
# are the assistant's (return_assistant_tokens_mask): an independent reference for the labels.
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "<assistant> {% generation %}{{ message['content'] }} </s> {% endgeneration %}"
    "{% else %}<{{ message['role'] }}> {{ message['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
CHAT = Example.chat([Message(m["role"], m["content"]) for m in SYSTEM_CHAT])
THREE_ANSWERS = Example.chat(
    [
        Message("user", "what does the cat say ?"),
        Message("assistant", "meow"),
        Message("assistant", "the cat says meow ."),
        Message("user", "tell me the dog sound"),
        Message("assistant", "woof is the dog sound ."),
    ]
)


def learned(encoded) -> list[bool]:
    return [label != IGNORE_INDEX for label in encoded.labels]


# --- chat template -----------------------------------------------------------------------------


@pytest.mark.parametrize("example", [CHAT, THREE_ANSWERS, Example("what does the cat say ?", "meow")])
def test_chat_labels_are_exactly_the_assistant_tokens_transformers_marks(chat_format, example):
    marked = make_tokenizer(MARKED_TEMPLATE)
    chat = [{"role": m.role, "content": m.content} for m in example.conversation()]
    assert marked.apply_chat_template(chat, tokenize=False) == chat_format.tokenizer.apply_chat_template(
        chat, tokenize=False
    )
    reference = marked.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    encoded = chat_format.encode(example, 512)
    assert list(encoded.input_ids) == reference["input_ids"]
    assert learned(encoded) == [bool(m) for m in reference["assistant_masks"]]
    assert [label for label in encoded.labels if label != IGNORE_INDEX] == [
        i for i, m in zip(encoded.input_ids, reference["assistant_masks"], strict=True) if m
    ]
    assert not encoded.truncated


def test_every_assistant_turn_of_a_chat_is_learned_with_its_end_of_turn(chat_format):
    tokenizer = chat_format.tokenizer
    encoded = chat_format.encode(CHAT, 512)
    tokens = tokenizer.convert_ids_to_tokens(list(encoded.input_ids))
    answers = [tok for tok, is_learned in zip(tokens, learned(encoded), strict=True) if is_learned]
    assert answers == "the cat says meow . </s> the dog says woof . </s>".split()
    assert tokens[:7] == ["<", "system", ">", "a", "plain", "line", "of"]  # the system prompt is kept


def test_a_one_turn_chat_and_its_pair_encode_alike_and_start_with_the_generation_prompt(chat_format):
    pair = Example("what does the cat say ?", "the cat says meow .")
    chat = Example.chat([Message("user", pair.prompt), Message("assistant", pair.response)])
    assert chat_format.encode(chat, 64) == chat_format.encode(pair, 64)
    prompt = chat_format.prompt_ids(pair.prompt)
    encoded = chat_format.encode(pair, 64)
    assert list(encoded.input_ids[: len(prompt)]) == prompt
    assert not any(learned(encoded)[: len(prompt)]) and all(learned(encoded)[len(prompt) :])


def test_a_chat_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # Like templates that drop an earlier answer's reasoning: earlier answers render differently.
    rewriting = (
        "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}<assistant> </s> "
        "{% else %}<{{ message['role'] }}> {{ message['content'] }} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    fmt = PromptFormat(make_tokenizer(rewriting))
    path = write(tmp_path / "d.jsonl", json.dumps({"prompt": "hi", "response": "ok"}) + "\n")
    path.write_text(path.read_text() + json.dumps({"messages": SYSTEM_CHAT}) + "\n")
    examples = load_file(path).examples
    assert len(encode_examples(fmt, examples[:1], 64)) == 1  # one answer: nothing earlier to rewrite
    with pytest.raises(DataError) as error:
        encode_examples(fmt, examples, 64)
    assert str(error.value).startswith(f"{path}, line 2: the tokenizer's chat template is not prefix-stable")


def test_a_conversation_the_template_refuses_is_a_data_error_naming_it():
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    fmt = PromptFormat(make_tokenizer(refusing + CHAT_TEMPLATE))
    example = Example.chat(CHAT.messages, where="chats.jsonl, line 3")
    with pytest.raises(DataError, match=r"^chats.jsonl, line 3: the tokenizer's chat template refused .*System role"):
        fmt.encode(example, 64)


# --- plain format ------------------------------------------------------------------------------


def test_without_a_template_chats_are_written_turn_by_turn_in_the_plain_format(plain_format):
    tokenizer = plain_format.tokenizer
    words = [
        ("a plain line of text", False),
        ("Question : what does the cat say ? Answer :", False),
        ("the cat says meow . </s>", True),
        ("Question : what does the dog say ? Answer :", False),
        ("the dog says woof . </s>", True),
    ]
    expected = [(tokenizer.convert_tokens_to_ids(w), is_learned) for text, is_learned in words for w in text.split()]
    encoded = plain_format.encode(CHAT, 512)
    assert list(encoded.input_ids) == [i for i, _ in expected]
    assert learned(encoded) == [is_learned for _, is_learned in expected]
    assert [i for i, is_learned in expected if is_learned] == [x for x in encoded.labels if x != IGNORE_INDEX]


@pytest.mark.parametrize("fmt_name", ["plain_format", "chat_format"])
def test_labels_cover_exactly_the_answer_and_its_end_token(request, fmt_name):
    fmt = request.getfixturevalue(fmt_name)
    example = Example("what does the cat say ?", "the cat says meow .")
    encoded = fmt.encode(example, 64)
    prompt = fmt.prompt_ids(example.prompt)
    assert list(encoded.input_ids[: len(prompt)]) == prompt
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(prompt)])
    answer = list(encoded.labels[len(prompt) :])
    assert answer == list(encoded.input_ids[len(prompt) :])
    assert fmt.tokenizer.eos_token_id in answer
    decoded = fmt.tokenizer.decode(answer, skip_special_tokens=True)
    assert decoded.split() == "the cat says meow .".split()
    assert supervised_tokens(encoded) == len(answer)


def test_chat_template_is_used_when_the_tokenizer_has_one(plain_format, chat_format):
    assert chat_format.uses_chat_template and not plain_format.uses_chat_template
    tokens = chat_format.tokenizer.convert_ids_to_tokens(chat_format.prompt_ids("what does the cat say ?"))
    assert tokens[0] == "<user>" and tokens[-1] == "<assistant>"
    assert plain_format.tokenizer.convert_ids_to_tokens(plain_format.prompt_ids("hi"))[:2] == ["Question", ":"]


def test_text_examples_learn_every_token(plain_format, chat_format):
    for fmt in (plain_format, chat_format):
        encoded = fmt.encode(Example("", "a plain line of text"), 64)
        assert IGNORE_INDEX not in encoded.labels
        assert encoded.labels == encoded.input_ids


# --- truncation and batches ----------------------------------------------------------------------


def test_long_answers_are_cut_and_long_prompts_dropped(plain_format):
    long_prompt = Example("what " * 40, "short")
    long_answer = Example("hi", "the cat says meow . " * 10)
    result = encode_examples(plain_format, [long_prompt, long_answer, Example("hi", "ok")], 16)
    assert result.dropped == 1 and result.truncated == 1 and len(result) == 2
    assert all(len(item.input_ids) <= 16 for item in result.items)
    assert result.items[0].truncated


@pytest.mark.parametrize("fmt_name", ["plain_format", "chat_format"])
def test_a_cut_chat_keeps_the_answers_that_fit_and_one_with_no_answer_left_is_dropped(request, fmt_name):
    fmt = request.getfixturevalue(fmt_name)
    whole = fmt.encode(CHAT, 512)
    first_answer = learned(whole).index(True)
    for length in range(first_answer + 1, len(whole.input_ids) + 1):
        cut = fmt.encode(CHAT, length)
        assert cut.input_ids == whole.input_ids[:length] and cut.labels == whole.labels[:length]
        assert cut.truncated == (length < len(whole.input_ids))
    result = encode_examples(fmt, [CHAT, Example("hi", "ok")], first_answer)
    assert fmt.encode(CHAT, first_answer) is None
    assert result.dropped == 1 and len(result) == 1


def test_collate_pads_right_with_masked_labels(plain_format):
    items = encode_examples(plain_format, [Example("hi", "the cat says meow ."), CHAT], 64).items
    batch = collate(items, pad_id=0)
    lengths = [len(item.input_ids) for item in items]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert torch.all(batch["labels"][short, min(lengths) :] == IGNORE_INDEX)
    assert torch.all(batch["input_ids"][short, min(lengths) :] == 0)
    for row, item in enumerate(items):
        assert batch["labels"][row, : lengths[row]].tolist() == list(item.labels)
