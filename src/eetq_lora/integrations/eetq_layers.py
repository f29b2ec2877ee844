"""The EETQ linear classes this package recognises: its own, and those of `eetq` and transformers where installed."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

from torch import nn


def is_eetq_available() -> bool:
    """Whether the ``eetq`` CUDA package is installed (this package never needs it)."""
    return importlib.util.find_spec("eetq") is not None


@lru_cache(maxsize=1)
def eetq_layer_classes() -> tuple[type[nn.Module], ...]:
    """Every EETQ linear class importable here: ours, ``eetq.EetqLinear``, transformers' EetqLinear."""
    from ..quant.linear import EetqLinear

    classes: list[type[nn.Module]] = [EetqLinear]
    if is_eetq_available():
        try:
            from eetq import EetqLinear as UpstreamEetqLinear

            classes.append(UpstreamEetqLinear)
        except Exception:  # a broken CUDA install must not break CPU users
            pass
    try:
        from transformers.integrations.eetq import EetqLinear as TransformersEetqLinear

        classes.append(TransformersEetqLinear)
    except Exception:
        pass
    return tuple(dict.fromkeys(classes))
