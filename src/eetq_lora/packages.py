"""Locate data shipped inside an installed package, without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MissingPackageError


def installed_package_folder(module: str, distribution: str, purpose: str, pip_args: str) -> Path:
    """The folder of the installed package ``module``; MissingPackageError (with its pip line) if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(distribution, purpose, pip_args)
    return Path(next(iter(spec.submodule_search_locations)))
