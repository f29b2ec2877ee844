"""The unit of training data: a prompt and its response, a whole chat, or a plain text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a chat: ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """A prompt/response pair, a multi-turn chat (``messages``), or a plain text (empty ``prompt``).

    Build chats with ``Example.chat``: their ``prompt`` is the first user turn and ``response`` the
    last assistant turn, for display and for the held-out split. ``where`` names the file and line
    it came from, for error messages; it takes no part in equality.
    """

    prompt: str
    response: str
    messages: tuple[Message, ...] = ()
    where: str = field(default="", compare=False, repr=False)

    @classmethod
    def chat(cls, messages: Sequence[Message], where: str = "") -> Example:
        """The chat ``messages`` (at least one assistant turn); one user turn then one answer is kept as a pair.

        Turns after the last assistant turn are left out: they take no part in the loss.
        """
        answers = [m.content for m in messages if m.role == "assistant"]
        if not answers:
            raise ValueError("a chat needs at least one assistant message")
        last = max(index for index, m in enumerate(messages) if m.role == "assistant")
        messages = tuple(messages[: last + 1])
        users = [m.content for m in messages if m.role == "user"]
        if [m.role for m in messages] == ["user", "assistant"]:
            return cls(users[0], answers[0], where=where)
        return cls(users[0] if users else "", answers[-1], messages, where)

    @property
    def is_text(self) -> bool:
        """Plain text: every token is learned."""
        return self.prompt == "" and not self.messages

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    def conversation(self) -> tuple[Message, ...]:
        """The turns of this example: its chat, or the pair as one user turn and one assistant turn."""
        if self.messages:
            return self.messages
        if self.is_text:
            raise ValueError("a plain-text example has no conversation")
        return (Message("user", self.prompt), Message("assistant", self.response))


@dataclass(frozen=True)
class Dataset:
    """Examples plus where they came from (shown in reports and saved in run records)."""

    examples: tuple[Example, ...]
    source: str

    def __len__(self) -> int:
        return len(self.examples)
