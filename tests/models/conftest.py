"""Shared fixtures for the model tests: a private cache folder and a saved tiny model with its tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import make_model_dir


def hide_package(monkeypatch, package: str) -> None:
    """Make ``package`` look not installed to importlib.util.find_spec."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep model conversions of a test out of the user's cache."""
    monkeypatch.setenv("EETQ_LORA_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved tiny Llama (2 layers, width 64) with a word-level tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))
