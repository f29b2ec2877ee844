"""Where converted models are cached: $EETQ_LORA_CACHE, else $XDG_CACHE_HOME/eetq_lora, else ~/.cache/eetq_lora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    explicit = os.environ.get("EETQ_LORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "eetq_lora"
