"""Data loading, the fixed held-out split, prompt formatting and batching."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from eetq_lora.data import (
    IGNORE_INDEX,
    Dataset,
    Example,
    PromptFormat,
    collate,
    encode_examples,
    load_dataset,
    load_file,
    split_dataset,
    supervised_tokens,
)
from eetq_lora.data.corpus import load_corpus, pairs_from_conversations
from eetq_lora.data.split import group_key
from eetq_lora.errors import DataError, MissingPackageError

from .conftest import CHAT_TEMPLATE, make_tokenizer, qa_pairs


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# --- files ---------------------------------------------------------------------------------


def test_jsonl_pairs_are_read_in_order_and_blank_lines_skipped(tmp_path):
    path = write(
        tmp_path / "d.jsonl", '{"prompt": " hi ", "response": "hello"}\n\n{"prompt": "a", "response": "b", "x": 1}\n'
    )
    dataset = load_file(path)
    assert dataset.examples == (Example("hi", "hello"), Example("a", "b"))
    assert dataset.source == str(path)


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"prompt": "a", "response": }', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a"}', 'no "response" field'),
        ('{"response": "a"}', 'no "prompt" field'),
        ('{"prompt": 3, "response": "a"}', '"prompt" must be a string'),
        ('{"prompt": "a", "response": "  "}', '"response" is empty'),
    ],
)
def test_a_malformed_jsonl_line_is_reported_with_its_line_number(tmp_path, bad_line, problem):
    good = '{"prompt": "q", "response": "r"}'
    path = write(tmp_path / "d.jsonl", f"{good}\n\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(DataError) as error:
        load_file(path)
    assert f"{path}, line 4" in str(error.value)
    assert problem in str(error.value)


def test_text_files_give_one_whole_text_example_per_line(tmp_path):
    dataset = load_file(write(tmp_path / "t.txt", "first line\n\n  second line  \n"))
    assert dataset.examples == (Example("", "first line"), Example("", "second line"))
    assert all(e.is_text for e in dataset.examples)


def test_missing_unknown_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown extension '.csv'"):
        load_file(write(tmp_path / "d.csv", "a,b\n"))
    with pytest.raises(DataError, match="holds no examples"):
        load_file(write(tmp_path / "empty.jsonl", "\n \n"))
    with pytest.raises(DataError, match="not a file"):
        load_file(tmp_path)
    with pytest.raises(DataError, match="not UTF-8"):
        (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
        load_file(tmp_path / "latin.txt")


# --- built-in corpus -------------------------------------------------------------------------


def test_conversations_become_consecutive_pairs_without_blanks_or_split_strings():
    conversations = [
        ["Hello", "Hi", "How are you?", "Fine."],
        ["What is 7 minus 0?", "7"],
        ["I", "n", " ", "a"],  # a sentence split into characters by mistake
        ["Question", "  "],
        "not a list",
    ]
    assert pairs_from_conversations(conversations) == [
        Example("Hello", "Hi"),
        Example("Hi", "How are you?"),
        Example("How are you?", "Fine."),
        Example("What is 7 minus 0?", "7"),
    ]


def test_missing_corpus_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "chatterbot_corpus" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingPackageError) as error:
        load_dataset(None)
    assert "pip install --no-deps chatterbot-corpus" in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus not installed")
def test_builtin_corpus_has_unique_english_pairs_and_a_fixed_held_out_split():
    dataset = load_corpus()
    assert len(dataset) > 1000
    assert len(set(dataset.examples)) == len(dataset)
    assert all(e.prompt and e.response for e in dataset.examples)
    split = split_dataset(dataset)
    assert split_dataset(load_corpus()) == split
    assert 0.05 < len(split.held_out) / len(dataset) < 0.15
    train_prompts = {group_key(e) for e in split.train}
    assert not any(group_key(e) in train_prompts for e in split.held_out)


# --- split -----------------------------------------------------------------------------------


def dataset_of(pairs) -> Dataset:
    return Dataset(tuple(Example(p["prompt"], p["response"]) for p in pairs), "test")


def test_split_keeps_each_prompt_on_one_side_whatever_the_order():
    pairs = qa_pairs() * 2 + [{"prompt": "What does the CAT say ?", "response": "meow"}]
    split = split_dataset(dataset_of(pairs))
    shuffled = list(pairs)
    random.Random(1).shuffle(shuffled)
    assert set(split_dataset(dataset_of(shuffled)).held_out) == set(split.held_out)
    held = {group_key(e) for e in split.held_out}
    assert held and not held & {group_key(e) for e in split.train}
    assert len(split.train) + len(split.held_out) == len(pairs)


def test_adding_data_never_moves_an_existing_example_across():
    pairs = qa_pairs()
    before = split_dataset(dataset_of(pairs[:30]))
    after = split_dataset(dataset_of(pairs))
    assert set(before.held_out) <= set(after.held_out)
    assert set(before.train) <= set(after.train)


def test_tiny_datasets_still_get_both_sides_and_one_prompt_is_refused():
    two = split_dataset(dataset_of(qa_pairs()[:2]))
    assert len(two.train) == 1 and len(two.held_out) == 1
    with pytest.raises(DataError, match="only one distinct prompt"):
        split_dataset(dataset_of([{"prompt": "same", "response": "a"}, {"prompt": "Same", "response": "b"}]))


# --- encoding --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_format():
    return PromptFormat(make_tokenizer())


@pytest.fixture(scope="module")
def chat_format():
    return PromptFormat(make_tokenizer(CHAT_TEMPLATE))


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


def test_text_examples_learn_every_token(plain_format):
    encoded = plain_format.encode(Example("", "a plain line of text"), 64)
    assert IGNORE_INDEX not in encoded.labels
    assert encoded.labels == encoded.input_ids


def test_long_answers_are_cut_and_long_prompts_dropped(plain_format):
    long_prompt = Example("what " * 40, "short")
    long_answer = Example("hi", "the cat says meow . " * 10)
    result = encode_examples(plain_format, [long_prompt, long_answer, Example("hi", "ok")], 16)
    assert result.dropped == 1 and result.truncated == 1 and len(result) == 2
    assert all(len(item.input_ids) <= 16 for item in result.items)
    assert result.items[0].truncated


def test_collate_pads_right_with_masked_labels(plain_format):
    items = encode_examples(plain_format, [Example("hi", "the cat says meow ."), Example("hi", "ok")], 32).items
    batch = collate(items, pad_id=0)
    lengths = [len(item.input_ids) for item in items]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert torch.all(batch["labels"][short, min(lengths) :] == IGNORE_INDEX)
    assert torch.all(batch["input_ids"][short, min(lengths) :] == 0)
    assert batch["labels"][short, : min(lengths)].tolist() == list(items[short].labels)


def test_jsonl_loaded_pairs_round_trip_through_json(tmp_path):
    pairs = qa_pairs()[:3]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    assert [(e.prompt, e.response) for e in load_dataset(path).examples] == [
        (p["prompt"], p["response"]) for p in pairs
    ]
