"""Example and Dataset: pairs, chats and plain texts, and the turns each one stands for."""

from __future__ import annotations

import dataclasses

import pytest

from eetq_lora.data import Dataset, Example, Message
from eetq_lora.data.examples import ROLES


def test_roles_are_system_user_and_assistant():
    assert ROLES == ("system", "user", "assistant")


def test_a_pair_is_one_user_turn_and_one_assistant_turn():
    pair = Example("what does the cat say ?", "meow")
    assert not pair.is_text and not pair.is_chat and pair.messages == ()
    assert pair.conversation() == (Message("user", "what does the cat say ?"), Message("assistant", "meow"))


def test_a_plain_text_has_an_empty_prompt_and_no_conversation():
    text = Example("", "a plain line of text")
    assert text.is_text and not text.is_chat
    with pytest.raises(ValueError, match="a plain-text example has no conversation"):
        text.conversation()


def test_one_question_and_one_answer_make_a_pair():
    chat = Example.chat([Message("user", "hi"), Message("assistant", "hello")], where="d.jsonl, line 2")
    assert chat == Example("hi", "hello") and chat.messages == () and not chat.is_chat
    assert chat.where == "d.jsonl, line 2"


def test_a_longer_chat_keeps_its_turns_up_to_the_last_answer():
    turns = [
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "what does the dog say ?"),
        Message("assistant", "woof"),
        Message("user", "and the cow ?"),  # after the last answer: not learned, so left out
    ]
    chat = Example.chat(turns)
    assert chat.is_chat and not chat.is_text
    assert chat.messages == tuple(turns[:5]) and chat.conversation() == tuple(turns[:5])
    assert chat.prompt == "hi" and chat.response == "woof"


def test_a_chat_without_a_user_turn_has_an_empty_prompt_but_is_not_a_text():
    chat = Example.chat([Message("system", "say hello"), Message("assistant", "hello")])
    assert chat.prompt == "" and chat.response == "hello"
    assert chat.is_chat and not chat.is_text
    assert chat.conversation() == (Message("system", "say hello"), Message("assistant", "hello"))


@pytest.mark.parametrize(
    "turns",
    [[], [Message("user", "hi")], [Message("system", "s"), Message("user", "hi")]],
    ids=["empty", "user", "system"],
)
def test_a_chat_needs_an_answer(turns):
    with pytest.raises(ValueError, match="a chat needs at least one assistant message"):
        Example.chat(turns)


def test_where_takes_no_part_in_equality_or_repr():
    here, there = Example("hi", "hello", where="a.jsonl, line 1"), Example("hi", "hello", where="b.csv, row 9")
    assert here == there and hash(here) == hash(there)
    assert "a.jsonl" not in repr(here)


def test_examples_and_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Example("hi", "hello").prompt = "changed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Message("user", "hi").role = "assistant"


def test_a_dataset_has_the_length_of_its_examples():
    dataset = Dataset((Example("a", "b"), Example("", "text"), Example("c", "d")), "qa.jsonl")
    assert len(dataset) == 3 and dataset.source == "qa.jsonl"
    assert len(Dataset((), "empty")) == 0
