"""Where a fine-tuning run keeps its files: the output folder OUT, its staging folder and their layout.

A run never writes OUT while it trains. It works in a staging folder, the hidden ``.NAME.partial``
next to OUT, which appears with the run's first checkpoint (``run_config.json`` and
``checkpoint/``, published together) and is moved onto OUT in one folder swap once the run has
written everything. A run killed or stopped before then leaves OUT as it was and its staging
folder resumable. Files of OUT that no run writes are carried over by that swap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..atomic import (
    disk_size,
    find_leftovers,
    format_size,
    public_file_mode,
    remove_path,
    replace_folder,
    restore_replaced,
)
from ..errors import UserError
from ..models.adapters import ADAPTER_CONFIG, RUN_CONFIG, SAFETENSORS_WEIGHTS
from .config import FinetuneConfig

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
STAGING_SUFFIX = ".partial"
METRICS = "metrics.json"
LOSS_PLOT = "loss.png"
# The adapter files a run publishes: what PEFT's save_pretrained writes and eval/generate read back.
ADAPTER_FILES = (ADAPTER_CONFIG, SAFETENSORS_WEIGHTS)
# Everything a run writes into OUT; anything else there is the user's own and is kept.
OUTPUT_NAMES = (*ADAPTER_FILES, METRICS, LOSS_PLOT, RUN_CONFIG, CHECKPOINT_DIR)


def staging_path(out: Path) -> Path:
    """The staging folder of the runs that write ``out``: ``.NAME.partial`` next to it."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def checkpoint_path(run_folder: Path) -> Path:
    """The checkpoint folder of a run folder (a staging folder or OUT)."""
    return Path(run_folder) / CHECKPOINT_DIR


def read_state(run_folder: Path) -> dict | None:
    """The progress record of the checkpoint in ``run_folder``, or None if there is none."""
    path = checkpoint_path(run_folder) / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_resumable(run_folder: Path) -> bool:
    """Whether ``run_folder`` holds a run's settings and a checkpoint to continue it from."""
    return (Path(run_folder) / RUN_CONFIG).is_file() and (checkpoint_path(run_folder) / STATE_FILE).is_file()


def find_resumable(out: Path) -> Path | None:
    """The folder ``--resume`` continues for ``out``: its staging folder, else ``out`` itself, else None."""
    for folder in (staging_path(out), Path(out)):
        if is_resumable(folder):
            return folder
    return None


def resume_source(out: Path) -> Path:
    """``find_resumable(out)``, or a UserError saying there is nothing to resume."""
    source = find_resumable(out)
    if source is None:
        raise UserError(
            f"nothing to resume for {out}: neither it nor {staging_path(out)} holds {RUN_CONFIG} and "
            f"{CHECKPOINT_DIR}/ from an earlier run"
        )
    return source


def load_run_config(folder: Path) -> FinetuneConfig:
    """The settings saved in ``folder``'s run_config.json."""
    return FinetuneConfig.from_dict(json.loads((Path(folder) / RUN_CONFIG).read_text())["settings"])


def output_folder(out: str | os.PathLike) -> Path:
    """``--out`` as a path whose last part names the folder (a link to a folder is followed, since the
    folder is replaced whole); refuse the root and the current folder."""
    path = Path(os.path.normpath(os.path.expanduser(os.fspath(out))))
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    if not path.name:
        raise UserError(f"--out {out} is the root folder; pass a folder for the results, such as runs/finetune")
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise UserError(
            f"--out {out} is the current folder or holds it, but the results replace --out as a whole folder; "
            "pass a subfolder, such as runs/finetune"
        )
    return path


def check_not_a_file(out: Path) -> None:
    """Refuse an ``--out`` that names a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder path")


def tidy_output(out: Path, log: Callable[[str], None]) -> None:
    """Undo what a killed run left behind around ``out``; call it holding ``out``'s lock.

    A run killed in the middle of replacing ``out`` may have left it missing with the old copy
    hidden next to it: that copy is put back. Hidden temporary files and folders of killed writes
    (next to ``out``, in it and in its staging folder) are removed, one line each.
    """
    restored = restore_replaced(out)
    if restored is not None:
        log(f"Restored {out} from {restored.name}, where a run killed while replacing it had left it")
    staging = staging_path(out)
    leftovers = [*find_leftovers(out.parent, out.name), *find_leftovers(out.parent, staging.name)]
    for folder in (out, staging):
        if folder.is_dir() and not folder.is_symlink():
            leftovers += find_leftovers(folder)
            # PEFT adapters are saved through a tempfile folder named .adapter.XXXXXXXX.
            leftovers += find_leftovers(folder, "adapter", ("",))
    for path in leftovers:
        size = disk_size(path)
        remove_path(path)
        log(f"Removed {path} ({format_size(size)}), left by an interrupted run")


def check_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber an existing output folder or an unfinished run; for a resume, return the folder
    it continues (the staging folder, else ``out``). Call it holding ``out``'s lock."""
    if resume:
        if overwrite:
            raise UserError("--resume continues the run saved in --out and --overwrite replaces it; pass only one")
        return resume_source(out)
    check_not_a_file(out)
    staging = staging_path(out)
    if staging.exists() and not overwrite:
        state = read_state(staging)
        progress = f" at step {state['step']}" if state else ""
        raise UserError(
            f"an unfinished run for {out} is saved in {staging}{progress}; pass --resume to continue it, "
            "--overwrite to start again (it is replaced once the new run saves a checkpoint), or a different --out"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} already exists and is not empty; pass --overwrite to replace its results, "
            f"--resume to continue the run saved there, or a different --out"
        )
    return None


def save_adapter(peft_model, folder: Path) -> None:
    """Save the PEFT adapter files into ``folder`` (a staging folder: they become visible with it, together)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=folder))
    try:
        peft_model.save_pretrained(tmp)
        for name in ADAPTER_FILES:
            os.chmod(tmp / name, public_file_mode())
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _carry(source: Path, destination: Path) -> None:
    """Copy a file, link or folder, hard-linking files where the filesystem allows (no bytes copied)."""

    def link_or_copy(src, dst) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(source, destination)


def publish_results(staging: Path, out: Path) -> None:
    """Make the finished run in ``staging`` the folder ``out`` in one swap.

    Files of ``out`` that no run writes (notes of your own, say) are carried over first, so only
    our results are replaced. Killed at any point, ``out`` holds the old results or the new ones
    (or, between the two renames, is restored by the next run's ``tidy_output``).
    """
    if out.is_dir():
        for entry in out.iterdir():
            if entry.name in OUTPUT_NAMES or (staging / entry.name).exists():
                continue
            # Copied under a temporary name, renamed once whole: a copy cut short (a full disk, a
            # kill) must not count as carried on the next attempt, whose swap would drop the rest.
            partial = staging / f".{entry.name}.carrying"
            remove_path(partial)
            try:
                _carry(entry, partial)
                os.replace(partial, staging / entry.name)
            except OSError as error:
                remove_path(partial)
                # shutil.copytree reports a list of (source, destination, reason): the first reason says it.
                errors = error.args[0] if isinstance(error, shutil.Error) and error.args else None
                first = str(errors[0][-1]) if isinstance(errors, list) and errors else str(error)
                raise UserError(
                    f"could not copy {entry} into the finished run ({first[:200]}); {out} is as it was, and "
                    "--resume tries again once the problem is fixed"
                ) from None
    try:
        replace_folder(staging, out)
    except OSError as error:
        raise UserError(
            f"could not move the finished run from {staging} to {out} ({error}); {out} is as it was, and "
            "--resume moves it once the problem is fixed"
        ) from None
