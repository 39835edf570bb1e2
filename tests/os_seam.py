"""The seam through which anyckpt touches local files: the ``os`` attribute of every module of
the storage package (the local backend, the facade) and of the lease (the local lock). Tests
replace it there to inject faults, check bounds or record what is touched."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import anyckpt.lease
import anyckpt.storage


def os_modules() -> list[ModuleType]:
    """Every module of anyckpt.storage, and anyckpt.lease, that has an ``os`` attribute."""
    names = ["anyckpt.storage", "anyckpt.lease"]
    names += [m.name for m in pkgutil.iter_modules(anyckpt.storage.__path__, "anyckpt.storage.")]
    modules = [importlib.import_module(name) for name in names]
    return [m for m in modules if hasattr(m, "os")]


def patch_os(monkeypatch: pytest.MonkeyPatch, fake: Any) -> None:
    """Make ``fake`` the ``os`` of every such module for the test."""
    for module in os_modules():
        monkeypatch.setattr(module, "os", fake)


@contextlib.contextmanager
def os_replaced(fake: Any) -> Iterator[Any]:
    """Make ``fake`` the ``os`` of every such module within the block."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_os(monkeypatch, fake)
        yield fake
