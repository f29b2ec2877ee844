"""One record as an Example: the three record forms, chats kept whole, and bad records named with their fix."""

from __future__ import annotations

import pytest

from eetq_lora.data import Example, Message
from eetq_lora.data.rows import example_from_record
from eetq_lora.errors import DataError

from .conftest import SYSTEM_CHAT

WHERE = "d.jsonl, line 7"


def load(record) -> Example:
    return example_from_record(record, WHERE)


def test_pairs_in_both_spellings_become_the_same_example():
    response = load({"prompt": " hi ", "response": "hello ", "extra": 1})
    completion = load({"prompt": "hi", "completion": "hello"})
    assert response == completion == Example("hi", "hello")
    assert not response.is_chat and not response.is_text
    assert response.where == WHERE


def test_a_chat_keeps_every_turn_including_the_system_prompt():
    example = load({"messages": SYSTEM_CHAT})
    assert example.is_chat
    assert example.messages == tuple(Message(m["role"], m["content"]) for m in SYSTEM_CHAT)
    assert example.conversation() == example.messages
    assert example.prompt == "what does the cat say ?" and example.response == "the dog says woof ."


def test_one_question_and_one_answer_is_the_same_as_a_pair():
    chat = load({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert chat == Example("hi", "hello") and not chat.is_chat
    assert chat.conversation() == (Message("user", "hi"), Message("assistant", "hello"))


def test_turns_after_the_last_answer_and_empty_system_prompts_are_left_out():
    messages = [
        {"role": "system", "content": "  "},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "anyone there ?"},
    ]
    assert load({"messages": messages}) == Example("hi", "hello")


def test_extra_message_fields_and_columns_left_empty_by_other_forms_are_ignored():
    # A Parquet or datasets table that mixes forms fills the unused columns with None; CSV with "".
    messages = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "hello", "tool_calls": None},
    ]
    assert load({"messages": messages, "prompt": None, "response": None}) == Example("hi", "hello")
    assert load({"messages": "", "prompt": "hi", "response": "hello", "completion": ""}) == Example("hi", "hello")
    assert load({"messages": [], "prompt": "hi", "response": "hello"}) == Example("hi", "hello")


def test_a_messages_cell_may_hold_the_chat_as_json_text():
    import json

    assert load({"messages": json.dumps(SYSTEM_CHAT)}) == load({"messages": SYSTEM_CHAT})


def test_conversational_prompt_and_completion_lists_join_into_one_chat():
    record = {"prompt": SYSTEM_CHAT[:4], "completion": SYSTEM_CHAT[4:]}
    assert load(record) == load({"messages": SYSTEM_CHAT})


@pytest.mark.parametrize(
    "record, problem",
    [
        (["a", "b"], "expected an object, got list"),
        ({"response": "a"}, 'no "prompt" field'),
        ({"completion": "a"}, 'no "prompt" field'),
        ({"prompt": "a"}, 'no "response" field'),
        ({"prompt": 3, "response": "a"}, '"prompt" must be a string, got int'),
        ({"prompt": "a", "response": "  "}, '"response" is empty'),
        ({"prompt": "a", "completion": ""}, '"completion" is empty'),
        ({"prompt": "", "response": "a"}, '"prompt" is empty'),
        ({"prompt": "a", "response": "b", "completion": "c"}, 'both "completion" and "response"'),
        ({"messages": {"role": "user"}}, '"messages" must be a list of messages, got dict'),
        ({"messages": "[{oops"}, '"messages" is text that is not valid JSON'),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "message 1: role 'tool'"),
        ({"messages": [{"content": "x"}]}, "message 1: no role"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, '"content" must be a string, got list'),
        ({"messages": ["hi"]}, "message 1: expected an object, got str"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "message 2: the assistant message is empty",
        ),
        (
            {"messages": [SYSTEM_CHAT[1], SYSTEM_CHAT[0], SYSTEM_CHAT[2]]},
            "message 2: a system message after the conversation started; put the system prompt first",
        ),
    ],
)
def test_a_bad_record_names_where_it_is_and_what_is_wrong(record, problem):
    with pytest.raises(DataError) as error:
        load(record)
    message = str(error.value)
    assert message.startswith(f"{WHERE}") and problem in message
    assert "\n" not in message
