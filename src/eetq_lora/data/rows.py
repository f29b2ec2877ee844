"""One record of a data file as an Example: ``messages``, ``prompt``/``completion`` or ``prompt``/``response``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..errors import DataError
from .examples import ROLES, Example, Message

RECORD_HELP = (
    'each record needs "messages" (a list of {"role": "system"|"user"|"assistant", "content": "..."}), '
    'or "prompt" and "completion", or "prompt" and "response"'
)
MESSAGE_HELP = 'each message needs a "role" ("system", "user" or "assistant") and a string "content"'


def _given(record: Mapping, key: str) -> bool:
    # Tables that mix forms fill a column a record does not use with None (Parquet, datasets),
    # "" (CSV) or an empty list.
    value = record.get(key)
    return value is not None and not (isinstance(value, (str, list, tuple)) and len(value) == 0)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _text(record: Mapping, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {_kind(value)}; write it as text in quotes')
    if not value.strip():
        raise DataError(f'{where}: "{key}" is empty; give it some text or remove the record')
    return value.strip()


def _message(item, where: str) -> Message | None:
    """The message ``item``, or None for an empty system prompt (which says nothing)."""
    if not isinstance(item, Mapping):
        raise DataError(f"{where}: expected an object, got {_kind(item)}; {MESSAGE_HELP}")
    role, content = item.get("role"), item.get("content")
    if role not in ROLES:
        got = "no role" if role is None else f"role {role!r}"
        raise DataError(f"{where}: {got}; {MESSAGE_HELP}")
    if not isinstance(content, str):
        raise DataError(f'{where}: "content" must be a string, got {_kind(content)}; {MESSAGE_HELP}')
    if not content.strip():
        if role == "system":
            return None
        raise DataError(f"{where}: the {role} message is empty; give it some text or remove the record")
    return Message(role, content.strip())


def parse_messages(value, where: str, key: str = "messages") -> list[Message]:
    """The chat turns of ``value`` (a list of role/content objects, or that list as a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f'{where}: "{key}" is text that is not valid JSON ({error.msg}); {RECORD_HELP}') from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f'{where}: "{key}" must be a list of messages, got {_kind(value)}; {RECORD_HELP}')
    field = "" if key == "messages" else f'"{key}" '
    messages = []
    for number, item in enumerate(value, start=1):
        at = f"{where}, {field}message {number}"
        message = _message(item, at)
        if message is None:
            continue
        if message.role == "system" and messages and messages[-1].role != "system":
            raise DataError(f"{at}: a system message after the conversation started; put the system prompt first")
        messages.append(message)
    return messages


def _chat(messages: list[Message], where: str) -> Example:
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from; add one or remove it")
    return Example.chat(messages, where)


def example_from_record(record, where: str) -> Example:
    """The Example of one record; a DataError names ``where`` (file and line or row), the problem and the fix."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object, got {_kind(record)}; {RECORD_HELP}")
    if _given(record, "messages"):
        return _chat(parse_messages(record["messages"], where), where)
    if not _given(record, "prompt"):
        if "prompt" in record and (_given(record, "response") or _given(record, "completion")):
            raise DataError(f'{where}: "prompt" is empty; give it some text or remove the record')
        raise DataError(f'{where}: the object has no "prompt" field; {RECORD_HELP}')
    answers = [key for key in ("completion", "response") if _given(record, key)]
    if len(answers) == 2:
        raise DataError(f'{where}: the object has both "completion" and "response"; keep one of them')
    if not answers:
        empty = next((key for key in ("completion", "response") if record.get(key) == ""), None)
        if empty:
            raise DataError(f'{where}: "{empty}" is empty; give it some text or remove the record')
        raise DataError(f'{where}: the object has no "response" field (it needs "response" or "completion")')
    answer = answers[0]
    if isinstance(record["prompt"], (list, tuple)):
        # The conversational prompt/completion form: both are lists of messages.
        turns = parse_messages(record["prompt"], where, "prompt") + parse_messages(record[answer], where, answer)
        return _chat(turns, where)
    return Example(_text(record, "prompt", where), _text(record, answer, where), where=where)
