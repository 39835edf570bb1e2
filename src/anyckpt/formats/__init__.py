"""Checkpoint formats: the interface, the registry, and the built-in formats.

Built-ins are registered here; third-party formats register under the ``anyckpt.formats``
entry-point group (the entry point names a class or a zero-argument factory returning an
object that implements :class:`~anyckpt.formats.base.CheckpointFormat`).
"""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import cast

import anyio
import anyio.to_thread

from ..errors import CheckpointNotFoundError, PluginError, PluginWarning, UnsupportedFormatError
from ..storage import Storage
from ._plugins import PluginInfo, blame, info_for, interface_problem
from .base import (
    CheckpointFormat,
    CheckpointReader,
    FormatBase,
    ReaderBase,
    TensorSlice,
    TensorSpec,
)
from .resolve import resolve_checkpoint
from .v1 import V1Format
from .v2 import V2Format

ENTRY_POINT_GROUP = "anyckpt.formats"

_BUILTINS: dict[str, CheckpointFormat] = {"v2": V2Format(), "v1": V1Format()}
_plugins: dict[str, CheckpointFormat] | None = None
#: Plugins that failed to load: name -> why (raised only when that format is asked for).
_broken: dict[str, str] = {}
#: Where each registered plugin came from (for errors that blame it).
_origins: dict[str, PluginInfo] = {}

__all__ = [
    "CheckpointFormat",
    "CheckpointReader",
    "FormatBase",
    "PluginInfo",
    "ReaderBase",
    "TensorSlice",
    "TensorSpec",
    "available_formats",
    "broken_plugins",
    "detect_format",
    "get_format",
    "loaded_format",
    "locate_checkpoint",
    "plugin_error",
    "register_format",
]


def _package(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"


def _load_one(ep: EntryPoint) -> CheckpointFormat:
    """The format an entry point names; UnsupportedFormatError naming it if it is broken."""
    package = _package(ep)
    what = f"format plugin {ep.name!r} ({ep.value}{', package ' + package if package else ''})"
    try:
        factory = ep.load()
        fmt = factory()
    except Exception as exc:
        raise UnsupportedFormatError(f"{what} failed to load: {type(exc).__name__}: {exc}") from exc
    problem = interface_problem(fmt)
    if problem is not None:
        raise UnsupportedFormatError(f"{what} does not implement CheckpointFormat: {problem}")
    _origins[ep.name] = info_for(ep.name, fmt, ep.value, package)
    return cast(CheckpointFormat, fmt)


def _load_plugins() -> dict[str, CheckpointFormat]:
    """The installed plugins that load; each broken one is skipped with one PluginWarning."""
    global _plugins
    if _plugins is None:
        found: dict[str, CheckpointFormat] = {}
        _broken.clear()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _BUILTINS:
                continue
            try:
                found[ep.name] = _load_one(ep)
            except UnsupportedFormatError as exc:
                _broken[ep.name] = str(exc)
                warnings.warn(
                    f"{exc}; skipped (the other formats work)", PluginWarning, stacklevel=4
                )
        _plugins = found
    return _plugins


def register_format(fmt: CheckpointFormat) -> None:
    """Register a format object under ``fmt.name`` (for formats not installed as packages).

    Raises TypeError naming the member at fault if ``fmt`` does not implement
    :class:`CheckpointFormat` (``write``, ``open``, ``detect`` and ``files`` are coroutine
    functions)."""
    problem = interface_problem(fmt)
    if problem is not None:
        raise TypeError(f"{fmt!r} does not implement CheckpointFormat: {problem}")
    _load_plugins()[fmt.name] = fmt
    _broken.pop(fmt.name, None)
    _origins[fmt.name] = info_for(fmt.name, fmt)


def available_formats() -> list[str]:
    """The names of the formats that work (broken plugins are left out: see
    :func:`broken_plugins`)."""
    return sorted({*_BUILTINS, *_load_plugins()})


def broken_plugins() -> dict[str, str]:
    """Installed plugins that failed to load: name -> the reason."""
    _load_plugins()
    return dict(_broken)


def get_format(name: str) -> CheckpointFormat:
    """The format registered under ``name``."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    plugins = _load_plugins()
    if name in plugins:
        return plugins[name]
    if name in _broken:
        raise UnsupportedFormatError(_broken[name])
    raise UnsupportedFormatError(
        f"unknown checkpoint format {name!r} (available: {', '.join(available_formats())})"
    )


def loaded_format(name: str) -> CheckpointFormat | None:
    """The format registered under ``name`` if that needs no loading (a built-in, or plugins
    already loaded); None when only :func:`get_format` can tell, by loading the plugins
    (scanning the installed packages' entry points and importing every plugin: blocking work
    to do in a worker thread when on an event loop)."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    if _plugins is None:
        return None
    return get_format(name)


async def detect_format(storage: Storage, prefix: str) -> CheckpointFormat:
    """The format of the checkpoint at ``prefix`` (built-ins first, then plugins; a plugin
    that failed to load is skipped)."""
    for fmt in _BUILTINS.values():
        if await fmt.detect(storage, prefix):
            return fmt
    # Loading plugins imports their packages: in a worker thread, off the event loop.
    plugins = _plugins if _plugins is not None else await anyio.to_thread.run_sync(_load_plugins)
    for fmt in list(plugins.values()):
        if await fmt.detect(storage, prefix):
            return fmt
    raise CheckpointNotFoundError("no checkpoint of any known format", path=storage.url(prefix))


def plugin_error(exc: BaseException) -> PluginError | None:
    """``exc`` as a :class:`PluginError` naming the plugin and its package, if a registered
    plugin's code raised it (None otherwise)."""
    info = blame(exc, list(_origins.values()))
    if info is None:
        return None
    error = PluginError(
        f"{info.describe()} failed: {type(exc).__name__}: {exc} "
        "(a bug in the plugin: report it to the plugin's authors)"
    )
    error.plugin = info  # type: ignore[attr-defined]
    return error


async def locate_checkpoint(storage: Storage, path: str) -> tuple[str, CheckpointFormat]:
    """The (prefix, format) of the checkpoint ``path`` names: its prefix or any one of its
    files (``.index``, ``.data-…``, ``.meta``, one V1 shard, a plugin's file). A file that is
    no checkpoint's raises an error saying what it is (see :mod:`.resolve`)."""
    formats = [*_BUILTINS.values(), *_load_plugins().values()]
    found = await resolve_checkpoint(storage, path, formats)
    if found is None:
        raise CheckpointNotFoundError("no checkpoint of any known format", path=storage.url(path))
    return found
