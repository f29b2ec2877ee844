"""The package's one cache folder, ``$EETQ_LORA_CACHE`` (else ``$XDG_CACHE_HOME/eetq_lora``, else
``~/.cache/eetq_lora``): converted models under ``models/``, compiled CPU kernels under ``kernels/``."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

CACHE_VARIABLE = "EETQ_LORA_CACHE"


class UnsafeFolderError(OSError):
    """A folder that code would be loaded from could be written by someone else."""


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    explicit = os.environ.get(CACHE_VARIABLE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "eetq_lora"


def fallback_cache_dir() -> Path:
    """Where to cache when the cache folder cannot be written: a per-user folder in the temp directory."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"eetq_lora-{user}"


def private_dir(path: Path) -> Path:
    """``path`` as a folder that only this user can change: created with mode 0700, or an existing one checked.

    Raises UnsafeFolderError when the folder (or its parent) is owned by another user, is writable
    by others, or is a symbolic link: compiled code loaded from there could be someone else's.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_owned_and_private(path, "folder")
    parent = os.stat(path.parent)
    others_write = parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    # A shared parent such as /tmp is fine when sticky and owned by root or us: nobody else can
    # rename or delete our folder there.
    trusted_owner = not hasattr(os, "getuid") or parent.st_uid in (0, os.getuid())
    if not trusted_owner or (others_write and not parent.st_mode & stat.S_ISVTX):
        raise UnsafeFolderError(f"{path.parent} can be changed by other users, so {path} could be replaced")
    return path


def check_private_file(path: Path) -> None:
    """Raise UnsafeFolderError unless ``path`` is a regular file of this user that others cannot write."""
    _check_owned_and_private(Path(path), "file")


def _check_owned_and_private(path: Path, what: str) -> None:
    info = os.lstat(path)
    expected = stat.S_ISDIR if what == "folder" else stat.S_ISREG
    if not expected(info.st_mode):
        raise UnsafeFolderError(f"{path} is not a plain {what} (a symbolic link or another kind of file)")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UnsafeFolderError(f"{path} belongs to user id {info.st_uid}, not to you ({os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFolderError(f"{path} is writable by other users (mode {stat.filemode(info.st_mode)})")
