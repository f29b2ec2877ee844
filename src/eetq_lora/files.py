"""Atomic writes: a file or folder either appears whole under its final name or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; published ones get the usual umask mode.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_file_mode() -> int:
    """The mode a plainly created file gets under the current umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    write_with_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with_atomic(path: str | os.PathLike, writer: Callable[[str], Any]) -> None:
    """Call ``writer(tmp_path)`` to produce the file, then move it onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, public_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish_folder(build: Callable[[Path], Any], destination: str | os.PathLike, if_exists: str = "replace") -> Path:
    """Build a folder with ``build(tmp_folder)`` next to ``destination``, then move it into place.

    ``if_exists`` says what happens when ``destination`` exists once the new folder is complete:
    ``"replace"`` swaps it out (renamed aside, then deleted; put back if the swap fails),
    ``"keep"`` keeps it and discards ours (a cache another process filled first), ``"error"``
    raises FileExistsError and discards ours. Nothing half-built is ever left under ``destination``.
    """
    if if_exists not in ("replace", "keep", "error"):
        raise ValueError(f"if_exists must be 'replace', 'keep' or 'error', got {if_exists!r}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if destination.exists() and if_exists != "replace":
            shutil.rmtree(tmp)
            if if_exists == "error":
                raise FileExistsError(f"{destination} appeared while it was being written; nothing was written")
            return destination
        old = None
        if destination.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
            os.rmdir(old)
            os.replace(destination, old)
        try:
            os.replace(tmp, destination)
        except OSError:
            if old is not None:
                os.replace(old, destination)
                raise
            # Only reachable when another process created destination between our check and here.
            if if_exists != "keep" or not destination.exists():
                raise
            shutil.rmtree(tmp)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination
