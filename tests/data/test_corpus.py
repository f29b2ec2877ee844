"""The built-in corpus: chatterbot-corpus conversations as question/answer pairs."""

from __future__ import annotations

import importlib.util

import pytest

from eetq_lora.data import Example, load_dataset, split_dataset
from eetq_lora.data.corpus import load_corpus, pairs_from_conversations
from eetq_lora.data.split import group_key
from eetq_lora.errors import MissingPackageError


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


@pytest.mark.parametrize("name", [None, "builtin"])
def test_missing_corpus_package_names_the_pip_command(monkeypatch, name):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda module, *a: None if module == "chatterbot_corpus" else real_find_spec(module, *a),
    )
    with pytest.raises(MissingPackageError) as error:
        load_dataset(name)
    assert "pip install --no-deps chatterbot-corpus" in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus not installed")
def test_builtin_corpus_has_unique_english_pairs_and_a_fixed_held_out_split():
    dataset = load_corpus()
    assert load_dataset("builtin") == load_dataset(None) == dataset
    assert len(dataset) > 1000
    assert len(set(dataset.examples)) == len(dataset)
    assert all(e.prompt and e.response for e in dataset.examples)
    split = split_dataset(dataset)
    assert split_dataset(load_corpus()) == split
    assert 0.05 < len(split.held_out) / len(dataset) < 0.15
    train_prompts = {group_key(e) for e in split.train}
    assert not any(group_key(e) in train_prompts for e in split.held_out)
