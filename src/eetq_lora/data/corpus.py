"""The built-in data: English question/answer pairs from the ``chatterbot-corpus`` package."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError, MissingPackageError
from ..packages import installed_package_folder
from .examples import Dataset, Example

CORPUS_PACKAGE = "chatterbot_corpus"
CORPUS_PIP = "--no-deps chatterbot-corpus==1.3.3"
CORPUS_NAME = "chatterbot-corpus (English)"


def corpus_folder() -> Path:
    """The folder of the installed corpus's English YAML files; the package is located, never imported."""
    package = installed_package_folder(CORPUS_PACKAGE, "chatterbot-corpus", "The built-in training data", CORPUS_PIP)
    folder = package / "data" / "english"
    if not folder.is_dir():
        raise DataError(f"the chatterbot-corpus package has no {folder}; reinstall it with: pip install {CORPUS_PIP}")
    return folder


def _is_split_string(conversation: list[str]) -> bool:
    # One corpus entry is a sentence split into single characters (a YAML mistake upstream):
    # every turn is one character. Real one-character answers ("7") come after a longer question.
    return len(conversation) > 2 and all(len(turn) <= 1 for turn in conversation)


def pairs_from_conversations(conversations: list) -> list[Example]:
    """Each turn of a conversation answered by the next one; blank turns and split strings are skipped."""
    pairs = []
    for conversation in conversations:
        if not isinstance(conversation, list):
            continue
        turns = [str(turn) for turn in conversation]
        if _is_split_string(turns):
            continue
        for prompt, response in zip(turns, turns[1:], strict=False):
            prompt, response = prompt.strip(), response.strip()
            if prompt and response:
                pairs.append(Example(prompt, response))
    return pairs


def load_corpus() -> Dataset:
    """All English pairs of the corpus, duplicates removed, in a fixed order (file name, then position)."""
    try:
        import yaml
    except ModuleNotFoundError:
        raise MissingPackageError("PyYAML", "The built-in training data", "pyyaml") from None
    examples: list[Example] = []
    for path in sorted(corpus_folder().glob("*.yml")):
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
        examples.extend(pairs_from_conversations(document.get("conversations") or []))
    unique = tuple(dict.fromkeys(examples))
    if not unique:
        raise DataError(f"the chatterbot-corpus package at {corpus_folder()} holds no conversations; reinstall it")
    return Dataset(unique, CORPUS_NAME)
