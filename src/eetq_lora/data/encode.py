"""Turn examples into token ids with loss labels (the assistant turns only), and pad them into batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import DataError
from .examples import Example, Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``labels`` is ``input_ids`` with every token that is not learned set to IGNORE_INDEX."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False


class PromptFormat:
    """How examples are written for a tokenizer: its chat template when it has one, else ``Question:/Answer:``.

    Training and generation share it, so ``prompt_ids(p)`` is always a prefix of ``encode(Example(p, r))``.
    Only the assistant turns are learned (with the end of each turn); plain texts are learned whole.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one so the model can learn where answers end")

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool, where: str = "") -> str:
        from jinja2 import TemplateError

        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError, TypeError, IndexError, KeyError) as error:
            raise DataError(
                f"{where or 'an example'}: the tokenizer's chat template refused this conversation ({error}); "
                "change the conversation to a form the model's template accepts"
            ) from None

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a response to ``prompt`` follows (what generation starts from)."""
        if self.uses_chat_template:
            return self._ids(self._render([Message("user", prompt)], True), special=False)
        return self._ids(f"Question: {prompt}\nAnswer:", special=True)

    def _prefix_length(self, ids: list[int], messages: Sequence[Message], generation: bool, where: str) -> int:
        head = self._ids(self._render(messages, generation, where), special=False)
        if ids[: len(head)] != head:
            raise DataError(
                f"{where or 'an example'}: the tokenizer's chat template is not prefix-stable (the first "
                f"{len(messages)} message(s) do not render and tokenize as the start of the whole conversation), "
                "so the assistant's tokens cannot be found; use a model whose template keeps earlier turns as they are"
            )
        return len(head)

    def _chat_ids(self, messages: Sequence[Message], where: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self._ids(self._render(messages, False, where), special=False)
        spans = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            # An answer is what the conversation up to it gains over the prompt that asks for it,
            # including the template's end of turn.
            start = self._prefix_length(ids, messages[:index], True, where)
            last = index == len(messages) - 1
            end = len(ids) if last else self._prefix_length(ids, messages[: index + 1], False, where)
            spans.append((start, end))
        return ids, spans

    def _plain_ids(self, messages: Sequence[Message]) -> tuple[list[int], list[tuple[int, int]]]:
        # Turn by turn, as prompt_ids writes one question: a chat of one question and one answer
        # gets exactly the ids of that pair.
        ids: list[int] = []
        spans = []
        for message in messages:
            first = not ids
            if message.role == "assistant":
                piece = self._ids(" " + message.content, special=first) + [self.tokenizer.eos_token_id]
                spans.append((len(ids), len(ids) + len(piece)))
            elif message.role == "user":
                piece = self._ids(f"Question: {message.content}\nAnswer:", special=first)
            else:
                piece = self._ids(f"{message.content}\n", special=first)
            ids += piece
        return ids, spans

    def token_spans(self, example: Example) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of the whole example and the ``[start, end)`` ranges of them that are learned."""
        if example.is_text:
            ids = self._ids(example.response, special=True) + [self.tokenizer.eos_token_id]
            return ids, [(0, len(ids))]
        if self.uses_chat_template:
            return self._chat_ids(example.conversation(), example.where)
        return self._plain_ids(example.conversation())

    def encode(self, example: Example, max_seq_len: int) -> Encoded | None:
        """Token ids and labels, cut to ``max_seq_len``; None if no learned token is left after the cut."""
        ids, spans = self.token_spans(example)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        encoded = Encoded(tuple(ids[:max_seq_len]), tuple(labels[:max_seq_len]), truncated=len(ids) > max_seq_len)
        return encoded if supervised_tokens(encoded) else None


@dataclass(frozen=True)
class EncodedSet:
    items: tuple[Encoded, ...]
    dropped: int
    truncated: int

    def __len__(self) -> int:
        return len(self.items)


def encode_examples(fmt: PromptFormat, examples: Sequence[Example], max_seq_len: int) -> EncodedSet:
    """Encode every example; too-long ones are cut, and dropped if no learned token is left (both are counted)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    items, dropped = [], 0
    for example in examples:
        encoded = fmt.encode(example, max_seq_len)
        if encoded is None or supervised_tokens(encoded) == 0:
            dropped += 1
        else:
            items.append(encoded)
    return EncodedSet(tuple(items), dropped, sum(item.truncated for item in items))


def supervised_tokens(encoded: Encoded) -> int:
    """How many tokens the loss is taken on (a label at position 0 has nothing before it to predict it)."""
    return sum(label != IGNORE_INDEX for label in encoded.labels[1:])


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX on padding)."""
    if not items:
        raise ValueError("collate got an empty batch")
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
