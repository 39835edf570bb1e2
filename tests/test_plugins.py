"""The format registry with plugins: the installed plugins are found by entry point and work
everywhere a built-in does; broken or unknown plugins give errors that name them."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anyckpt
import anyckpt.errors
import anyckpt.formats as formats
import anyckpt.sync


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget loaded plugins now and after the test."""
    monkeypatch.setattr(formats, "_plugins", None)
    yield
    formats._plugins = None


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *specs: tuple[str, str]) -> None:
    eps = [importlib.metadata.EntryPoint(name, value, "anyckpt.formats") for name, value in specs]

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        assert group == "anyckpt.formats"
        return eps

    monkeypatch.setattr(formats, "entry_points", entry_points)


INSTALLED = [name for name in ("zstd", "safetensors") if name in anyckpt.available_formats()]


@pytest.mark.parametrize("name", INSTALLED)
def test_installed_plugins_work_like_built_ins(tmp_path: Path, name: str) -> None:
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "n": np.array(3)}
    written = anyckpt.sync.save(tmp_path / "c", tensors, format=name)
    assert all(os.path.exists(p) for p in written)
    loaded = anyckpt.sync.load(tmp_path / "c")  # detected among all formats
    for key, value in tensors.items():
        assert loaded[key].tobytes() == value.tobytes(), key
    with anyckpt.sync.open(tmp_path / "c") as reader:
        assert reader.files() == written
        assert reader.read("w", (slice(1, 3),)).tolist() == tensors["w"][1:3].tolist()


@pytest.mark.anyio
@pytest.mark.parametrize("name", INSTALLED)
async def test_plugins_under_the_manager(tmp_path: Path, name: str) -> None:
    async with anyckpt.CheckpointManager(
        tmp_path, max_to_keep=1, format=name, durable=False
    ) as manager:
        for step in (1, 2):
            await (await manager.save({"w": np.full(3, float(step))}, step))
        restored = await manager.restore()
    assert restored["w"].tolist() == [2.0, 2.0, 2.0]
    leftovers = sorted(p for p in os.listdir(tmp_path) if p != "checkpoint")
    assert len(leftovers) == 1  # retention deleted step 1 through the plugin's files()
    assert leftovers[0].startswith("ckpt-2")


def test_both_plugins_are_installed_for_the_test_suite() -> None:
    # `make test` installs them (Makefile); a missing one would silently skip the above.
    assert INSTALLED == ["zstd", "safetensors"]


def test_a_plugin_is_loaded_from_its_entry_point(
    monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    fake_entry_points(monkeypatch, ("zstd2", "anyckpt_zstd:ZstdFormat"))
    assert "zstd2" in anyckpt.available_formats()
    assert type(anyckpt.get_format("zstd2")).__name__ == "ZstdFormat"


def test_a_plugin_cannot_shadow_a_built_in(
    monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    fake_entry_points(monkeypatch, ("v2", "anyckpt_zstd:ZstdFormat"))
    assert type(anyckpt.get_format("v2")).__name__ == "V2Format"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("no_such_module_anyckpt:Format", "failed to load"),
        ("anyckpt.formats.v2:NoSuchClass", "failed to load"),
        ("builtins:object", "does not implement CheckpointFormat: it has no 'name'"),
    ],
)
def test_broken_plugins_are_skipped_with_one_warning_and_named_when_asked_for(
    monkeypatch: pytest.MonkeyPatch, fresh_registry: None, value: str, message: str
) -> None:
    fake_entry_points(monkeypatch, ("broken", value), ("zstd2", "anyckpt_zstd:ZstdFormat"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        names = anyckpt.available_formats()
        anyckpt.available_formats()
    assert len(record) == 1  # once, not on every lookup
    assert record[0].category is anyckpt.errors.PluginWarning
    assert message in str(record[0].message)
    assert "'broken'" in str(record[0].message)
    assert "broken" not in names
    assert "zstd2" in names  # the others still work
    assert "broken" in anyckpt.formats.broken_plugins()
    with pytest.raises(anyckpt.UnsupportedFormatError, match=message) as info:
        anyckpt.get_format("broken")  # only asking for it by name raises
    assert "'broken'" in str(info.value)
    assert value in str(info.value)


class _Fmt:
    name = "partial"

    async def write(self, *args: Any, **kwargs: Any) -> list[str]:
        return []

    async def open(self, *args: Any) -> Any:
        raise NotImplementedError

    async def detect(self, *args: Any) -> bool:
        return False

    async def files(self, *args: Any) -> list[str]:
        return []


class _SyncDetect(_Fmt):
    def detect(self, *args: Any) -> bool:  # type: ignore[override]
        return False


class _NoFiles:
    name = "nofiles"
    write, open, detect = _Fmt.write, _Fmt.open, _Fmt.detect


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_SyncDetect, "'detect' is not a coroutine function"),
        (_NoFiles, "it has no 'files' member"),
    ],
)
def test_registration_checks_members_and_coroutines(
    monkeypatch: pytest.MonkeyPatch, fresh_registry: None, cls: type, message: str
) -> None:
    with pytest.raises(TypeError, match=f"does not implement CheckpointFormat: {message}"):
        anyckpt.register_format(cls())
    fake_entry_points(monkeypatch, ("bad", f"{__name__}:{cls.__name__}"))
    with pytest.warns(anyckpt.errors.PluginWarning, match=message):
        assert "bad" not in anyckpt.available_formats()
    with pytest.raises(anyckpt.UnsupportedFormatError, match=message):
        anyckpt.get_format("bad")


def test_unknown_format_lists_what_exists() -> None:
    with pytest.raises(anyckpt.UnsupportedFormatError, match="unknown checkpoint format") as info:
        anyckpt.get_format("nope")
    assert "v1" in str(info.value)
    assert "v2" in str(info.value)


def test_register_format_checks_the_interface(fresh_registry: None) -> None:
    with pytest.raises(TypeError, match="does not implement"):
        anyckpt.register_format(object())  # type: ignore[arg-type]

    class Named(_Fmt):
        name = "named"

    anyckpt.register_format(Named())
    assert "named" in anyckpt.available_formats()


def test_detection_finds_no_format_for_nothing(tmp_path: Path) -> None:
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        anyckpt.sync.load(tmp_path / "nothing-here")


THREAD_PROBE_PLUGIN = """
import threading
from anyckpt_zstd import ZstdFormat

IMPORTED_ON = threading.get_ident()
MADE_ON = []
MADE = []

def factory():
    MADE_ON.append(threading.get_ident())
    MADE.append(ZstdFormat())
    return MADE[-1]
"""


@pytest.mark.anyio
async def test_a_plugin_named_on_the_event_loop_loads_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    """Loading plugins scans the installed packages and imports every plugin: blocking
    work. A manager constructed on the event loop with a plugin format not loaded yet loads
    it on entering, in a worker thread (issue #19); the plugin's import and factory record
    their thread."""
    module = f"anyckpt_thread_probe_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(THREAD_PROBE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points(monkeypatch, ("zstd", f"{module}:factory"))
    loop = threading.get_ident()
    manager = anyckpt.CheckpointManager(tmp_path / "run", format="zstd", durable=False)
    assert module not in sys.modules  # nothing loaded while constructing on the loop
    async with manager:
        await (await manager.save({"w": np.arange(4.0)}, 1))
        restored = await manager.restore()
    probe = sys.modules[module]
    assert loop != probe.IMPORTED_ON
    assert probe.MADE_ON
    assert loop not in probe.MADE_ON
    assert manager.format is probe.MADE[0]  # the plugin's object wrote the checkpoint
    assert restored["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.anyio
async def test_an_unknown_format_named_on_the_event_loop_fails_on_entering(
    tmp_path: Path, fresh_registry: None
) -> None:
    """Deferred to entering (a worker thread), the lookup still refuses an unknown name with
    the same error, and nothing is opened."""
    manager = anyckpt.CheckpointManager(tmp_path / "run", format="no-such-format")
    with pytest.raises(anyckpt.UnsupportedFormatError, match="unknown checkpoint format"):
        async with manager:
            pass
    assert not (tmp_path / "run").exists()


def test_a_plugin_named_off_the_event_loop_loads_at_construction(
    tmp_path: Path, fresh_registry: None
) -> None:
    with pytest.raises(anyckpt.UnsupportedFormatError, match="unknown checkpoint format"):
        anyckpt.CheckpointManager(tmp_path, format="no-such-format")
    manager = anyckpt.CheckpointManager(tmp_path, format="zstd")
    assert formats._plugins is not None
    assert "zstd" in formats._plugins
    assert manager.format is formats._plugins["zstd"]
