"""Checkpoint formats: the interface, the registry, and the built-in formats.

Built-ins are registered here; third-party formats register under the ``anyckpt.formats``
entry-point group (the entry point names a class or a zero-argument factory returning an
object that implements :class:`~anyckpt.formats.base.CheckpointFormat`).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import CheckpointNotFoundError, UnsupportedFormatError
from ..storage import Storage
from .base import CheckpointFormat, CheckpointReader, TensorSlice, TensorSpec
from .resolve import resolve_checkpoint
from .v1 import V1Format
from .v2 import V2Format

ENTRY_POINT_GROUP = "anyckpt.formats"

_BUILTINS: dict[str, CheckpointFormat] = {"v2": V2Format(), "v1": V1Format()}
_plugins: dict[str, CheckpointFormat] | None = None

__all__ = [
    "CheckpointFormat",
    "CheckpointReader",
    "TensorSlice",
    "TensorSpec",
    "available_formats",
    "detect_format",
    "get_format",
    "locate_checkpoint",
    "register_format",
]


def _load_plugins() -> dict[str, CheckpointFormat]:
    global _plugins
    if _plugins is None:
        found: dict[str, CheckpointFormat] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _BUILTINS:
                continue
            try:
                factory = ep.load()
                fmt = factory()
            except Exception as exc:
                raise UnsupportedFormatError(
                    f"format plugin {ep.name!r} ({ep.value}) failed to load: {exc}"
                ) from exc
            if not isinstance(fmt, CheckpointFormat):
                raise UnsupportedFormatError(
                    f"format plugin {ep.name!r} ({ep.value}) does not implement CheckpointFormat"
                )
            found[ep.name] = fmt
        _plugins = found
    return _plugins


def register_format(fmt: CheckpointFormat) -> None:
    """Register a format object under ``fmt.name`` (for formats not installed as packages)."""
    if not isinstance(fmt, CheckpointFormat):
        raise TypeError(f"{fmt!r} does not implement CheckpointFormat")
    _load_plugins()[fmt.name] = fmt


def available_formats() -> list[str]:
    return sorted({*_BUILTINS, *_load_plugins()})


def get_format(name: str) -> CheckpointFormat:
    """The format registered under ``name``."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    plugins = _load_plugins()
    if name in plugins:
        return plugins[name]
    raise UnsupportedFormatError(
        f"unknown checkpoint format {name!r} (available: {', '.join(available_formats())})"
    )


async def detect_format(storage: Storage, prefix: str) -> CheckpointFormat:
    """The format of the checkpoint at ``prefix`` (built-ins first, then plugins)."""
    for fmt in [*_BUILTINS.values(), *_load_plugins().values()]:
        if await fmt.detect(storage, prefix):
            return fmt
    raise CheckpointNotFoundError("no checkpoint of any known format", path=storage.url(prefix))


async def locate_checkpoint(storage: Storage, path: str) -> tuple[str, CheckpointFormat]:
    """The (prefix, format) of the checkpoint ``path`` names: its prefix or any one of its
    files (``.index``, ``.data-…``, ``.meta``, one V1 shard, a plugin's file). A file that is
    no checkpoint's raises an error saying what it is (see :mod:`.resolve`)."""
    formats = [*_BUILTINS.values(), *_load_plugins().values()]
    found = await resolve_checkpoint(storage, path, formats)
    if found is None:
        raise CheckpointNotFoundError("no checkpoint of any known format", path=storage.url(path))
    return found
