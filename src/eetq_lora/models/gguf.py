"""Convert a .gguf model once into a plain safetensors model folder, cached by the file's content hash."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from pathlib import Path

from ..atomic import publish_folder
from ..cache import cache_dir
from ..errors import MissingPackageError, ModelError

GGUF_PIP = "'gguf>=0.10.0'"
MARKER = "eetq_lora_source.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(gguf_path: Path, digest: str) -> Path:
    """The cache folder for a .gguf file of this content."""
    return cache_dir() / "models" / f"{gguf_path.stem}-{digest[:16]}"


def _convert(gguf_path: Path, folder: Path, digest: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF model carries a gguf quantization_config and refuses save_pretrained; a model
    # rebuilt from the same config without it holds identical (dequantized) weights and saves.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del gguf_model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}, indent=2) + "\n")


def gguf_to_folder(gguf_path: str | Path, quiet: bool = False) -> Path:
    """A cached safetensors folder holding ``gguf_path``'s model and tokenizer, converted on first use.

    The conversion (tens of seconds) is published atomically, so an interrupted or concurrent
    conversion never leaves a half-written cache entry behind.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelError(
            f"model file {gguf_path} does not exist; pass an existing .gguf file or a model folder to --model"
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("gguf", f"Loading the GGUF model {gguf_path.name}", GGUF_PIP)
    digest = file_sha256(gguf_path)
    folder = converted_folder(gguf_path, digest)
    if (folder / MARKER).is_file():
        return folder
    if not quiet:
        print(
            f"Converting {gguf_path.name} to a cached safetensors model in {folder} (first run only)...",
            file=sys.stderr,
            flush=True,
        )
    # A folder without its marker is a damaged entry and is replaced; one that appears while we convert
    # is another process's complete conversion and is kept.
    if_exists = "replace" if folder.exists() else "keep"
    try:
        publish_folder(lambda tmp: _convert(gguf_path, tmp, digest), folder, if_exists=if_exists)
    except (ValueError, KeyError, OSError, struct.error) as error:  # struct.error: a file cut short
        raise ModelError(f"could not convert {gguf_path} with transformers' GGUF loader: {error}") from error
    return folder
