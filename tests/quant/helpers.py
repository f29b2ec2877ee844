"""A tiny Llama's float checkpoint on disk, shared by the quantization tests."""

from __future__ import annotations

from tests.helpers import tiny_llama


def float_folder(path, seed=0, max_shard_size=None, **overrides):
    """Save a tiny Llama's float checkpoint in ``path``; returns the model."""
    model = tiny_llama(seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model
