"""Atomic file writes and folder swaps, their recovery after a kill, leftover detection and the folder lock."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from eetq_lora.atomic import (
    FolderBusyError,
    FolderLock,
    disk_size,
    find_leftovers,
    format_size,
    lock_path,
    publish_folder,
    remove_path,
    replace_folder,
    restore_replaced,
    write_json_atomic,
    write_text_atomic,
)
from eetq_lora.errors import UserError


def make_folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def test_replace_folder_moves_a_complete_folder_in_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    replace_folder(make_folder(tmp_path / "first", a="1"), target)  # no folder there yet
    assert contents(target) == {"a": "1"}
    replace_folder(make_folder(tmp_path / "second", b="2"), target)
    assert contents(target) == {"b": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_the_two_renames_is_undone_by_restore_replaced(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "out", old="1")
    new = make_folder(tmp_path / "new", new="2")
    real_replace = os.replace

    def killed_on_second_rename(src, dst):
        if Path(src) == new:
            raise SystemExit("killed")  # not an OSError: nothing is put back, as after SIGKILL
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_second_rename)
    with pytest.raises(SystemExit):
        replace_folder(new, target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()
    (hidden,) = find_leftovers(tmp_path, "out", (".old",))
    assert contents(hidden) == {"old": "1"}

    assert restore_replaced(target) == hidden
    assert contents(target) == {"old": "1"}
    assert restore_replaced(target) is None  # only when the folder is missing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "out", old="1")
    new = make_folder(tmp_path / "new", new="2")
    real_replace = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError("no space left")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="no space"):
        replace_folder(new, target)
    assert contents(target) == {"old": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_find_leftovers_matches_only_temporary_names(tmp_path):
    names = [
        ".out.abcd_123.tmp",  # publish_folder's build folder
        ".out.zz99zz99.old",  # replace_folder's old copy
        ".metrics.json.q1w2e3r4.tmp",  # write_with_atomic's file
        ".adapter.a1b2c3d4",  # a tempfile folder named by prefix only
        ".out.lock",
        ".out.partial",
        "out",
        ".out.ABCD1234.tmp",  # tempfile never uses capitals
        ".out.abc.tmp",
        "notes.abcd1234.tmp",
    ]
    for name in names:
        (tmp_path / name).mkdir()
    found = {p.name for p in find_leftovers(tmp_path)}
    assert found == {".out.abcd_123.tmp", ".out.zz99zz99.old", ".metrics.json.q1w2e3r4.tmp"}
    assert {p.name for p in find_leftovers(tmp_path, "out")} == {".out.abcd_123.tmp", ".out.zz99zz99.old"}
    assert {p.name for p in find_leftovers(tmp_path, "adapter", ("",))} == {".adapter.a1b2c3d4"}
    assert find_leftovers(tmp_path / "missing") == []

    # publish_folder's own temporary names are among those it finds (it removes them itself when it fails).
    seen = []
    publish_folder(lambda folder: seen.extend(find_leftovers(tmp_path, "built")), tmp_path / "built")
    assert len(seen) == 1 and seen[0].name.endswith(".tmp")


def test_sizes_and_removal(tmp_path):
    folder = make_folder(tmp_path / "f", a="x" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "b").write_bytes(b"y" * 48)
    assert disk_size(folder) == 1048 and disk_size(folder / "a") == 1000
    assert [format_size(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]
    remove_path(folder / "a")
    remove_path(folder)
    remove_path(folder)  # already gone: nothing to do
    assert not folder.exists()


def test_the_lock_refuses_a_second_holder_and_is_released_on_exit(tmp_path):
    target = tmp_path / "out"
    with FolderLock(target, "run A"):
        assert lock_path(target).read_text() == f"{os.getpid()}\n"
        second = FolderLock(target, "another run", "try later")
        with pytest.raises(FolderBusyError) as refused:
            second.acquire()
        message = str(refused.value)
        assert isinstance(refused.value, UserError) and "\n" not in message
        assert message.startswith(f"{target} is in use by another run (pid {os.getpid()}); try later")
        assert not target.exists()
    assert not lock_path(target).exists()  # removed on release
    with FolderLock(target):
        pass


def test_a_killed_holder_leaves_a_stale_lock_file_that_blocks_nothing(tmp_path):
    target = tmp_path / "out"
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes the lock and waits to be killed
        try:
            FolderLock(target).acquire()
            os.write(ready_write, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_write)
    assert os.read(ready_read, 1) == b"1"
    with pytest.raises(FolderBusyError, match=f"pid {pid}"):
        FolderLock(target).acquire()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert lock_path(target).exists()  # SIGKILL left the file, but the OS released the lock
    with FolderLock(target):
        assert lock_path(target).read_text() == f"{os.getpid()}\n"


def test_atomic_writes_replace_whole_files_with_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.txt"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_publish_folder_replaces_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    publish_folder(lambda f: (f / "a").write_text("1"), target)
    publish_folder(lambda f: (f / "b").write_text("2"), target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]

    def broken(folder: Path) -> None:
        (folder / "c").write_text("3")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_folder(broken, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_publish_folder_without_replace_keeps_the_first_one(tmp_path):
    target = tmp_path / "model"
    publish_folder(lambda f: (f / "first").write_text("1"), target, if_exists="keep")
    publish_folder(lambda f: (f / "second").write_text("2"), target, if_exists="keep")
    assert [p.name for p in target.iterdir()] == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_folder_error_mode_refuses_an_existing_folder_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine").write_text("user data")
    with pytest.raises(FileExistsError, match="nothing was written"):
        publish_folder(lambda f: (f / "new").write_text("2"), target, if_exists="error")
    assert [p.name for p in target.iterdir()] == ["mine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="if_exists"):
        publish_folder(lambda f: None, target, if_exists="merge")


def test_publish_folder_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    publish_folder(lambda f: (f / "old").write_text("1"), target)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        publish_folder(lambda f: (f / "new").write_text("2"), target)
    assert [p.name for p in target.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
