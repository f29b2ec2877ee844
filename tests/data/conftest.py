"""Shared fixtures for the data tests: tokenizers built in memory and records in every supported form."""

from __future__ import annotations

import pytest

from eetq_lora.data import PromptFormat
from tests.helpers import CHAT_TEMPLATE, make_tokenizer

# One record of each form, with the Examples they must load as.
SYSTEM_CHAT = [
    {"role": "system", "content": "a plain line of text"},
    {"role": "user", "content": "what does the cat say ?"},
    {"role": "assistant", "content": "the cat says meow ."},
    {"role": "user", "content": "what does the dog say ?"},
    {"role": "assistant", "content": "the dog says woof ."},
]
RECORDS = [
    {"prompt": "what does the cow say ?", "response": "the cow says moo ."},
    {"prompt": "what does the fox say ?", "completion": "the fox says yip ."},
    {"messages": SYSTEM_CHAT},
    {"messages": [{"role": "user", "content": "what does the owl say ?"}, {"role": "assistant", "content": "hoot"}]},
]


@pytest.fixture(scope="session")
def plain_format():
    return PromptFormat(make_tokenizer())


@pytest.fixture(scope="session")
def chat_format():
    return PromptFormat(make_tokenizer(CHAT_TEMPLATE))
