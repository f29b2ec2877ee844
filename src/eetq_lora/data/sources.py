"""Which data a run trains and scores on: the built-in corpus or a file, and an optional separate held-out set."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import DataError
from .corpus import load_corpus
from .examples import Dataset
from .files import load_file
from .split import split_dataset

BUILTIN = "builtin"


def is_builtin(data: str | os.PathLike | None) -> bool:
    """Whether ``data`` names the built-in corpus: None (old run records) or ``"builtin"``."""
    return data is None or (isinstance(data, str) and data == BUILTIN)


def load_dataset(path: str | os.PathLike | None) -> Dataset:
    """The examples of ``path`` (any data file or saved folder), or the built-in corpus for None or ``"builtin"``."""
    return load_corpus() if is_builtin(path) else load_file(path, "--data")


def load_eval_dataset(path: str | os.PathLike) -> Dataset:
    """A separate held-out set (the formats of ``load_file``); all of it is held out."""
    if is_builtin(path):
        raise DataError(
            "--eval-data takes a data file or folder, not the built-in data; "
            "leave --eval-data out to hold out part of --data"
        )
    return load_file(path, "--eval-data")


def data_argument(value: str | None) -> str:
    """``--data`` as a run records it: ``"builtin"`` when it is left out, else an absolute path."""
    return BUILTIN if is_builtin(value) else os.path.abspath(os.path.expanduser(value))


def eval_data_argument(value: str | None) -> str | None:
    """``--eval-data`` as a run records it: None when it is left out, else an absolute path."""
    return None if value is None else os.path.abspath(os.path.expanduser(value))


@dataclass(frozen=True)
class DataChoice:
    """The data a run trains on and the held-out set it is scored on (``eval_data``, else a split of ``data``)."""

    data: str = BUILTIN
    eval_data: str | None = None

    @classmethod
    def from_settings(cls, settings: Mapping | None) -> DataChoice | None:
        """The choice a run recorded in its settings, None when it recorded none."""
        if settings is None:
            return None
        return cls(data_argument(settings.get("data")), settings.get("eval_data") or None)

    def held_out_name(self) -> str:
        """The held-out set in words: the ``eval_data`` path, or the split of ``data``."""
        if self.eval_data is not None:
            return self.eval_data
        return f"the held-out split of {'the built-in data' if is_builtin(self.data) else self.data}"


def choose_eval_data(
    data_flag: str | None, eval_data_flag: str | None, recorded: Sequence[tuple[str, Mapping | None]]
) -> tuple[DataChoice, list[str]]:
    """The one held-out set every adapter is scored on, and a note for each adapter trained on other data.

    ``recorded`` holds each adapter's label and recorded settings (None if it has none), in order.
    ``--data``/``--eval-data`` win; else the first adapter with recorded settings decides, data and
    held-out set together; else the built-in data.
    """
    if data_flag is not None or eval_data_flag is not None:
        return DataChoice(data_argument(data_flag), eval_data_argument(eval_data_flag)), []
    choices = [(label, DataChoice.from_settings(settings)) for label, settings in recorded]
    known = [(label, choice) for label, choice in choices if choice is not None]
    chosen = known[0][1] if known else DataChoice()
    notes = [
        f"{label} was scored in training on {choice.held_out_name()}; every model here is scored on "
        f"{chosen.held_out_name()} (pass --data or --eval-data to choose)"
        for label, choice in known[1:]
        if choice.held_out_name() != chosen.held_out_name()
    ]
    return chosen, notes


def held_out_set(choice: DataChoice) -> Dataset:
    """The held-out examples of ``choice``: all of its ``eval_data``, else the fixed split of its ``data``."""
    if choice.eval_data is not None:
        return load_eval_dataset(choice.eval_data)
    dataset = load_dataset(choice.data)
    return Dataset(split_dataset(dataset).held_out, dataset.source)
