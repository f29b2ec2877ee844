"""Turn examples into token ids with loss labels, and pad them into batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .examples import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``labels`` is ``input_ids`` with the prompt part set to IGNORE_INDEX."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False


class PromptFormat:
    """How a prompt is written for a tokenizer: its chat template when it has one, else ``Question:/Answer:``.

    Training and generation share it, so ``prompt_ids(p)`` is always a prefix of ``encode(Example(p, r))``.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one so the model can learn where answers end")

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a response to ``prompt`` follows (what generation starts from)."""
        if self.uses_chat_template:
            return self._ids(self._chat([{"role": "user", "content": prompt}], True), special=False)
        return self._ids(f"Question: {prompt}\nAnswer:", special=True)

    def response_ids(self, prompt: str, response: str) -> list[int]:
        """The ids the model learns after ``prompt_ids(prompt)``, ending with the end-of-answer token."""
        if self.uses_chat_template:
            user = [{"role": "user", "content": prompt}]
            head = self._chat(user, True)
            full = self._chat(user + [{"role": "assistant", "content": response}], False)
            if full.startswith(head):
                # The template's own answer ending (e.g. "<|im_end|>\n") is learned with the answer.
                return self._ids(full[len(head) :], special=False)
        return self._ids(" " + response, special=False) + [self.tokenizer.eos_token_id]

    def encode(self, example: Example, max_seq_len: int) -> Encoded | None:
        """Token ids and labels, cut to ``max_seq_len``; None if the prompt leaves no room for an answer token."""
        if example.is_text:
            prompt: list[int] = []
            answer = self._ids(example.response, special=True) + [self.tokenizer.eos_token_id]
        else:
            prompt = self.prompt_ids(example.prompt)
            answer = self.response_ids(example.prompt, example.response)
        if len(prompt) >= max_seq_len:
            return None
        ids = (prompt + answer)[:max_seq_len]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        return Encoded(tuple(ids), tuple(labels), truncated=len(prompt) + len(answer) > max_seq_len)


@dataclass(frozen=True)
class EncodedSet:
    items: tuple[Encoded, ...]
    dropped: int
    truncated: int

    def __len__(self) -> int:
        return len(self.items)


def encode_examples(fmt: PromptFormat, examples: Sequence[Example], max_seq_len: int) -> EncodedSet:
    """Encode every example; too-long prompts are dropped, too-long answers cut (both are counted)."""
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
