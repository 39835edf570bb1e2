"""Checking a format object against the interface, and telling which plugin an error came
from. The registry (:mod:`anyckpt.formats`) uses both: a plugin that does not fit is refused at
registration with the member at fault named, and the CLI blames a plugin's own exceptions on it
rather than on anyckpt."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .base import hook_problem

#: The coroutine methods every format has (``async def``).
ASYNC_MEMBERS = ("write", "open", "detect", "files")


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered format came from."""

    name: str  # the format's (entry point's) name
    source: str  # ``module:attr`` of the entry point, or the class's qualified name
    package: str | None  # the distribution, ``name version``, when known
    module: str  # the top-level module of the plugin's code

    def describe(self) -> str:
        where = f"package {self.package}" if self.package else self.source
        return f"format plugin {self.name!r} ({where})"


def interface_problem(fmt: Any) -> str | None:
    """Why ``fmt`` does not implement CheckpointFormat (None when it does)."""
    name = getattr(fmt, "name", None)
    if not isinstance(name, str) or not name:
        return "it has no 'name' (a non-empty str)"
    for member in ASYNC_MEMBERS:
        method = getattr(fmt, member, None)
        if method is None:
            return f"it has no '{member}' member"
        if not inspect.iscoroutinefunction(method):
            return f"'{member}' is not a coroutine function (it must be 'async def {member}')"
    return hook_problem(fmt)  # the optional members, declared on formats.base.FormatBase


def info_for(
    name: str, fmt: Any, source: str | None = None, package: str | None = None
) -> PluginInfo:
    """The :class:`PluginInfo` of ``fmt``, registered as ``name``."""
    cls = type(fmt)
    module = (source.split(":", 1)[0] if source else cls.__module__).split(".")[0]
    return PluginInfo(name, source or f"{cls.__module__}:{cls.__qualname__}", package, module)


def blame(exc: BaseException, plugins: list[PluginInfo]) -> PluginInfo | None:
    """The plugin whose code raised ``exc`` (the innermost plugin frame of its traceback)."""
    by_module = {p.module: p for p in plugins if p.module not in {"anyckpt", "__main__"}}
    found: PluginInfo | None = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        found = by_module.get(module, found)
        tb = tb.tb_next
    return found
