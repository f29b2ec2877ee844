"""The output folder policy: where a run stages, what --resume continues, what replacing OUT keeps."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from eetq_lora.errors import UserError
from eetq_lora.training.run_folder import (
    check_output,
    find_resumable,
    output_folder,
    publish_results,
    resume_source,
    staging_path,
)


def make_run(folder: Path, step: int) -> Path:
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "state.json").write_text(json.dumps({"step": step}))
    (folder / "run_config.json").write_text(json.dumps({"settings": {}}))
    return folder


def test_resume_prefers_the_unfinished_run_in_the_staging_folder(tmp_path):
    out = tmp_path / "run"
    assert staging_path(out) == tmp_path / ".run.partial"
    assert find_resumable(out) is None
    with pytest.raises(UserError, match=r"nothing to resume for .*run: neither it nor .*\.run\.partial holds"):
        resume_source(out)
    make_run(out, 10)
    assert find_resumable(out) == resume_source(out) == out
    make_run(staging_path(out), 3)
    assert find_resumable(out) == staging_path(out)
    (staging_path(out) / "run_config.json").unlink()  # a folder without its settings is not resumable
    assert find_resumable(out) == out


def test_check_output_refuses_to_clobber_and_returns_what_resume_continues(tmp_path):
    out = tmp_path / "run"
    assert check_output(out, resume=False, overwrite=False) is None  # nothing there yet
    with pytest.raises(UserError, match="pass only one"):
        check_output(out, resume=True, overwrite=True)
    out.write_text("a file")
    with pytest.raises(UserError, match="is a file; pass a folder path"):
        check_output(out, resume=False, overwrite=True)
    out.unlink()
    make_run(out, 4)
    with pytest.raises(UserError, match="already exists and is not empty; pass --overwrite"):
        check_output(out, resume=False, overwrite=False)
    assert check_output(out, resume=False, overwrite=True) is None
    make_run(staging_path(out), 2)
    with pytest.raises(UserError, match=r"an unfinished run for .* is saved in .*\.run\.partial at step 2"):
        check_output(out, resume=False, overwrite=False)
    assert check_output(out, resume=True, overwrite=False) == staging_path(out)


def test_publishing_keeps_the_users_files_and_drops_outputs_the_new_run_did_not_write(tmp_path):
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("mine")
    (out / "readme.txt").write_text("also mine")
    os.symlink("readme.txt", out / "link")
    (out / "loss.png").write_bytes(b"old plot")  # an output of ours the new run did not draw
    (out / "metrics.json").write_text("{old}")
    staging.mkdir()
    (staging / "metrics.json").write_text("{new}")
    publish_results(staging, out)
    assert not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == ["link", "metrics.json", "notes", "readme.txt"]
    assert (out / "metrics.json").read_text() == "{new}"
    assert (out / "notes" / "todo.txt").read_text() == "mine"
    assert os.readlink(out / "link") == "readme.txt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old copy is gone


def test_a_copy_of_the_users_files_cut_short_is_redone_whole_by_the_next_attempt(tmp_path, monkeypatch):
    # A full disk while carrying OUT's own files into the finished run: the half-copied folder must
    # not count as carried next time, or the swap would drop the files it lacks.
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    (out / "notes").mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (out / "notes" / name).write_text(name)
    staging.mkdir()
    (staging / "metrics.json").write_text("{new}")
    real_copy, copies = shutil.copy2, []

    def disk_fills_on_the_second_file(src, dst, *args, **kwargs):
        copies.append(src)
        if len(copies) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no hard links")))
    monkeypatch.setattr(shutil, "copy2", disk_fills_on_the_second_file)
    with pytest.raises(UserError, match=r"could not copy .*notes into the finished run \(\[Errno 28\] No space left"):
        publish_results(staging, out)
    assert sorted(p.name for p in (out / "notes").iterdir()) == ["a.txt", "b.txt"]
    assert sorted(p.name for p in staging.iterdir()) == ["metrics.json"]
    publish_results(staging, out)  # the disk has room again
    assert sorted(p.name for p in (out / "notes").iterdir()) == ["a.txt", "b.txt"]
    assert (out / "metrics.json").read_text() == "{new}"


def test_a_failed_swap_says_that_out_is_as_it_was(tmp_path):
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    with pytest.raises(UserError, match=r"could not move the finished run .* is as it was, and --resume moves it"):
        publish_results(staging, out)  # the staging folder is missing


def test_out_is_a_named_folder_other_than_the_current_one(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert output_folder("runs/x/../finetune") == Path("runs/finetune")
    assert output_folder("~/runs") == Path.home() / "runs"
    os.symlink(tmp_path / "elsewhere", tmp_path / "alias")
    assert output_folder(tmp_path / "alias") == tmp_path / "elsewhere"
    for refused in (".", tmp_path, "/"):
        with pytest.raises(UserError, match="root folder|current folder or holds it"):
            output_folder(refused)
