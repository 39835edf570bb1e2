"""The exceptions anyckpt raises. Every one names the file (or prefix) and what was wrong."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error anyckpt raises on purpose."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, damaged or not what it claims to be."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, or one of the files it consists of, does not exist."""


class UnsupportedFormatError(CheckpointError):
    """The files are valid but use a format, dtype or feature anyckpt does not support."""


class UnsafePathError(CheckpointError):
    """A path (for example from a state file) points outside the checkpoint directory."""


class ConcurrentWriterError(CheckpointError):
    """Another writer changed the checkpoint directory under this manager."""


class PluginError(CheckpointError):
    """A format plugin failed in its own code (a bug to report to the plugin's authors)."""


class PluginWarning(UserWarning):
    """A format plugin could not be loaded; the other formats work without it."""


class InvalidOptionError(ValueError, TypeError):
    """A format option that the format does not declare, or a value of the wrong type.

    Both a :class:`ValueError` and a :class:`TypeError`; the message names the valid options."""


class StorageAccessError(CheckpointError):
    """A remote store refused access or could not be used: no credentials, or credentials
    it does not accept. The message says what to check (:attr:`hint`)."""

    def __init__(self, message: str, *, path: str | None = None, hint: str = "") -> None:
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message, path=path)


class RemoteUnavailableError(StorageAccessError):
    """A remote store could not be reached at all: connection refused, unknown host, no
    route. Not retried: trying again does not help until the endpoint or network is fixed."""
