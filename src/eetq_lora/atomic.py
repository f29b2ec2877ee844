"""Atomic writes: a file or folder either appears whole under its final name or not at all.

Also what keeps a folder's writers apart and cleans up after a killed one: a lock file next to the
folder, and finding, restoring or removing the hidden temporary entries a killed writer left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock, so FolderLock does nothing there
    fcntl = None


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
    ``"replace"`` swaps it out (see ``replace_folder``), ``"keep"`` keeps it and discards ours (a
    cache another process filled first), ``"error"`` raises FileExistsError and discards ours.
    Nothing half-built is ever left under ``destination``.
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
        try:
            replace_folder(tmp, destination)
        except OSError:
            # Only reachable without replace when another process created destination after our check.
            if if_exists != "keep" or not destination.exists():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def replace_folder(new: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Move the complete folder ``new`` to ``destination``, replacing the folder there if there is one.

    An existing ``destination`` is first renamed to a hidden ``.NAME.XXXXXXXX.old`` next to it, then
    ``new`` is renamed into place and the old copy deleted; if that second rename fails, the old
    copy is put back. A process killed between the two renames leaves ``destination`` missing and
    the old copy hidden, which ``restore_replaced`` puts back.
    """
    new, destination = Path(new), Path(destination)
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
        os.rmdir(old)
        os.replace(destination, old)
    try:
        os.replace(new, destination)
    except OSError:
        if old is not None:
            os.replace(old, destination)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# The hidden names tempfile gives the temporary entries above: "." + name + "." + 8 random characters.
_RANDOM_PART = r"[a-z0-9_]{8}"


def find_leftovers(
    folder: str | os.PathLike, name: str | None = None, suffixes: tuple[str, ...] = (".tmp", ".old")
) -> list[Path]:
    """The hidden temporary entries of ``folder`` (``.NAME.XXXXXXXX.tmp`` or ``.old``) that a killed writer left.

    ``name`` limits them to those of one file or folder; ``suffixes`` are the endings to look for
    (``""`` for a plain ``tempfile`` folder named with a prefix only). Call it only while no other
    process writes there: a writer's temporary entry looks the same as a leftover.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stem = re.escape(name) if name is not None else r".+"
    ending = "|".join(re.escape(suffix) for suffix in suffixes)
    pattern = re.compile(rf"\.{stem}\.{_RANDOM_PART}(?:{ending})")
    return sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name))


def restore_replaced(destination: str | os.PathLike) -> Path | None:
    """Put back the old copy that ``replace_folder`` hid, if a process was killed before the new one moved in.

    Only when ``destination`` is missing; returns the hidden folder it came from, or None. With
    several candidates the most recently renamed one is restored.
    """
    destination = Path(destination)
    if destination.exists() or destination.is_symlink():
        return None
    candidates = [path for path in find_leftovers(destination.parent, destination.name, (".old",)) if path.is_dir()]
    if not candidates:
        return None
    latest = max(candidates, key=lambda path: path.stat().st_ctime)
    os.replace(latest, destination)
    return latest


def disk_size(path: str | os.PathLike) -> int:
    """Bytes held by the file, or by all files under the folder, at ``path`` (links not followed)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def format_size(size: float) -> str:
    """``size`` bytes in the largest binary unit that keeps the number at least 1 (e.g. "1.5 MiB")."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while size >= 1024 and index < len(units) - 1:
        size /= 1024
        index += 1
    return f"{size:.0f} B" if index == 0 else f"{size:.1f} {units[index]}"


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, link or whole folder."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class FolderBusyError(UserError):
    """Another process holds the lock of a folder it is writing."""


def lock_path(destination: str | os.PathLike) -> Path:
    """The lock file of ``destination``: a hidden ``.NAME.lock`` next to it."""
    destination = Path(destination)
    return destination.parent / f".{destination.name}.lock"


class FolderLock:
    """An exclusive OS lock (``flock``) on the lock file next to a folder, so one process at a time writes it.

    ``acquire`` raises FolderBusyError at once when another process holds it. The OS drops the lock
    when its holder exits, killed or not, so a stale lock file never blocks. ``release`` deletes
    the file. Without ``fcntl`` (Windows) it does nothing.
    """

    def __init__(
        self,
        destination: str | os.PathLike,
        holder: str = "another process",
        hint: str = "wait for it to finish or pick another folder",
    ) -> None:
        self.destination = Path(destination)
        self.path = lock_path(destination)
        self.holder = holder
        self.hint = hint
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f"{self.holder} (pid {pid})" if pid.isdigit() else self.holder
                raise FolderBusyError(
                    f"{self.destination} is in use by {who}; {self.hint} "
                    f"(the lock {self.path} is released when that process exits)"
                ) from None
            # The previous holder deletes the file before it unlocks: if ours was deleted meanwhile, lock anew.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
