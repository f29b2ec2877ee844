"""A tiny Llama's float checkpoint on disk and the names of its linear layers, shared by the quantization tests."""

from __future__ import annotations

from tests.helpers import tiny_llama

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def float_folder(path, seed=0, max_shard_size=None, **overrides):
    """Save a tiny Llama's float checkpoint in ``path``; returns the model."""
    model = tiny_llama(seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model
