"""The held-out set: the fixed split by prompt, or a separate file with its prompts kept out of training."""

from __future__ import annotations

import random

import pytest

from eetq_lora.data import Dataset, Example, Message, split_dataset, training_split
from eetq_lora.data.split import group_key
from eetq_lora.errors import DataError
from tests.helpers import qa_pairs


def dataset_of(pairs, source: str = "test") -> Dataset:
    return Dataset(tuple(Example(p["prompt"], p["response"]) for p in pairs), source)


def test_split_keeps_each_prompt_on_one_side_whatever_the_order():
    pairs = qa_pairs() * 2 + [{"prompt": "What does the CAT say ?", "response": "meow"}]
    split = split_dataset(dataset_of(pairs))
    shuffled = list(pairs)
    random.Random(1).shuffle(shuffled)
    assert set(split_dataset(dataset_of(shuffled)).held_out) == set(split.held_out)
    held = {group_key(e) for e in split.held_out}
    assert held and not held & {group_key(e) for e in split.train}
    assert len(split.train) + len(split.held_out) == len(pairs)
    assert split.overlap == 0


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


def test_chats_are_grouped_by_their_user_turns_whatever_the_system_prompt():
    def chat(system: str, *users: str) -> Example:
        turns = [Message("system", system)] if system else []
        for user in users:
            turns += [Message("user", user), Message("assistant", f"answer to {user}")]
        return Example.chat(turns)

    assert group_key(chat("be brief", "Hi  there")) == group_key(chat("be long", "hi there"))
    assert group_key(chat("be brief", "hi there")) == group_key(Example("hi there", "hello"))
    assert group_key(chat("", "hi", "what now")) != group_key(chat("", "hi", "what next"))
    assert group_key(chat("", "hi", "what now")) != group_key(Example("hi", "hello"))


def test_a_separate_held_out_set_is_held_out_whole_in_its_own_order():
    pairs = qa_pairs()
    held_out = dataset_of(list(reversed(pairs[:5])) + [{"prompt": "a new question", "response": "x"}], "eval.jsonl")
    train = dataset_of(pairs[3:])
    split = training_split(train, held_out)
    assert split.held_out == held_out.examples
    # Two training examples share a prompt with the held-out set: they are left out, and counted.
    assert split.train == train.examples[2:]
    assert split.overlap == 2 and split.held_out_source == "eval.jsonl"
    assert training_split(train) == split_dataset(train)
    assert split_dataset(train).held_out_source is None


def test_training_data_that_is_all_held_out_is_refused():
    pairs = qa_pairs()[:4]
    with pytest.raises(DataError, match="every example of train.jsonl has a prompt that is also in the held-out data"):
        training_split(dataset_of(pairs, "train.jsonl"), dataset_of(pairs, "eval.jsonl"))
