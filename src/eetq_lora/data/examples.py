"""The unit of training data: one prompt and the response the model should learn."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A prompt/response pair. ``prompt`` is empty for plain-text data, where the whole text is learned."""

    prompt: str
    response: str

    @property
    def is_text(self) -> bool:
        return self.prompt == ""


@dataclass(frozen=True)
class Dataset:
    """Examples plus where they came from (shown in reports and saved in run records)."""

    examples: tuple[Example, ...]
    source: str

    def __len__(self) -> int:
        return len(self.examples)
