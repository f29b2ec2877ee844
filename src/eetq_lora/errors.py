"""Errors a user can fix. Their message names the problem and the fix; the CLI prints it as is."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing prerequisite: nothing was written, and the message says what to do."""


class ConfigError(UserError, ValueError):
    """A setting is out of range."""


class DataError(UserError):
    """A data file is missing, malformed or empty."""


class ModelError(UserError):
    """A model path is missing or is not a model this package can load."""


class MissingPackageError(UserError):
    """An optional package that this feature needs is not installed."""

    def __init__(self, package: str, purpose: str, pip_args: str) -> None:
        self.package = package
        self.pip_command = f"pip install {pip_args}"
        super().__init__(
            f"{purpose} needs the package {package!r}, which is not installed. Install it with: {self.pip_command}"
        )
