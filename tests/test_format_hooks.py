"""The optional members of a format and a reader (``options``, ``has_checksums``,
``tf_saver_version``, ``checkpoint_path``; ``read_slices``): declared with their defaults on
``formats.base.FormatBase`` / ``ReaderBase``, which the built-ins and bundled plugins inherit.
A third-party format that inherits neither gets the same defaults everywhere anyckpt asks."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

import anyckpt
import anyckpt.formats as formats
from anyckpt.formats.base import (
    FormatBase,
    Index,
    ReaderBase,
    TensorSpec,
    check_options,
    checkpoint_path,
    declared_options,
    has_checksums,
    key_view,
    read_slices,
    tf_saver_version,
)
from anyckpt.meta import saver_version
from anyckpt.storage import Storage


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget registered plugins now and after the test."""
    monkeypatch.setattr(formats, "_plugins", None)
    yield
    formats._plugins = None


# -- a third-party format written against the protocol alone (no base class) ----------------


def _path(prefix: str) -> str:
    return prefix + ".npz"


class BareReader:
    """A reader with only the protocol's members: no ``read_slices``, no base class."""

    def __init__(self, prefix: str, path: str, arrays: dict[str, np.ndarray]) -> None:
        self.prefix = prefix
        self._path = path
        self._arrays = arrays
        self.reads: list[tuple[str, Index]] = []

    def keys(self) -> list[str]:
        return sorted(self._arrays)

    def spec(self, key: str) -> TensorSpec:
        array = self._arrays[key]
        return TensorSpec(array.dtype, tuple(array.shape))

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        self.reads.append((key, index))
        array = self._arrays[key]  # a KeyError for a name it lacks
        return array if index is None else array[index]

    async def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        return {k: await self.read(k, verify=verify) for k in (keys or self.keys())}

    def files(self) -> list[str]:
        return [self._path]

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> BareReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class BareFormat:
    """One ``.npz`` file per checkpoint, through the Storage; none of the optional members."""

    name = "bare-npz"

    async def write(
        self,
        storage: Storage,
        prefix: str,
        tensors: Mapping[str, np.ndarray],
        *,
        durable: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> list[str]:
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in tensors.items()})
        path = _path(prefix)
        data = buffer.getvalue()
        await anyio.to_thread.run_sync(partial(storage.write_bytes, path, data, durable=durable))
        return [path]

    async def open(self, storage: Storage, prefix: str) -> BareReader:
        data = await anyio.to_thread.run_sync(storage.read_bytes, _path(prefix))
        with np.load(io.BytesIO(data)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return BareReader(prefix, _path(prefix), arrays)

    async def detect(self, storage: Storage, prefix: str) -> bool:
        return bool(await anyio.to_thread.run_sync(storage.exists, _path(prefix)))

    async def files(self, storage: Storage, prefix: str) -> list[str]:
        return [_path(prefix)] if await self.detect(storage, prefix) else []


class DerivedFormat(FormatBase, BareFormat):
    """The same format, inheriting the declared defaults."""

    name = "derived-npz"


def test_a_format_without_the_base_class_gets_the_declared_defaults() -> None:
    bare, derived = BareFormat(), DerivedFormat()
    assert not isinstance(bare, FormatBase)
    for fmt in (bare, derived):
        assert declared_options(fmt) is None  # type: ignore[arg-type]
        assert has_checksums(fmt) is False  # type: ignore[arg-type]
        assert tf_saver_version(fmt) is None  # type: ignore[arg-type]
        assert checkpoint_path(fmt, "d/ckpt-3", ["d/ckpt-3.npz"]) == "d/ckpt-3"  # type: ignore[arg-type]
        check_options(fmt, {"anything": 1})  # type: ignore[arg-type]  # undeclared: unchecked
        with pytest.raises(anyckpt.UnsupportedFormatError, match="no TensorFlow Saver"):
            saver_version(fmt)
    # The defaults come from one place: the base class's attributes.
    assert (derived.options, derived.has_checksums, derived.tf_saver_version) == (
        None,
        False,
        None,
    )


def test_the_built_ins_and_bundled_plugins_inherit_the_base_classes() -> None:
    names = ["v1", "v2", *(n for n in ("zstd", "safetensors") if n in anyckpt.available_formats())]
    for name in names:
        fmt = anyckpt.get_format(name)
        assert isinstance(fmt, FormatBase), name
        assert has_checksums(fmt) is fmt.has_checksums  # type: ignore[attr-defined]
        assert declared_options(fmt) is fmt.options  # type: ignore[attr-defined]
    assert tf_saver_version(anyckpt.get_format("v1")) == 1
    assert tf_saver_version(anyckpt.get_format("v2")) == 2
    assert saver_version(anyckpt.get_format("v2")) == 2


@pytest.mark.parametrize(
    ("member", "value", "message"),
    [
        ("has_checksums", "yes", "'has_checksums' must be a bool"),
        ("tf_saver_version", 3, "'tf_saver_version' must be None, 1 or 2"),
        ("tf_saver_version", True, "'tf_saver_version' must be None, 1 or 2"),
        ("options", ["level"], "'options' must be None or a mapping"),
        ("options", {"level": int}, "'options' must be None or a mapping"),
    ],
)
def test_registration_refuses_misdeclared_optional_members(
    fresh_registry: None, member: str, value: object, message: str
) -> None:
    fmt = BareFormat()
    setattr(fmt, member, value)
    with pytest.raises(TypeError, match=message):
        anyckpt.register_format(fmt)  # type: ignore[arg-type]


def test_registration_refuses_an_async_checkpoint_path(fresh_registry: None) -> None:
    class AsyncPath(BareFormat):
        async def checkpoint_path(self, prefix: str, written: Sequence[str]) -> str:
            return prefix

    with pytest.raises(TypeError, match="'checkpoint_path' must be a plain"):
        anyckpt.register_format(AsyncPath())  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("cls", [BareFormat, DerivedFormat])
async def test_a_third_party_format_under_the_manager(
    tmp_path: Path, fresh_registry: None, cls: type[BareFormat]
) -> None:
    fmt = cls()
    anyckpt.register_format(fmt)  # type: ignore[arg-type]
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    async with anyckpt.CheckpointManager(
        tmp_path, max_to_keep=2, format=fmt.name, durable=False
    ) as manager:
        for step in (1, 2):
            await (await manager.save({"w": w * step, "b": np.ones(2)}, step))
        assert manager.latest_checkpoint is not None
        assert posixpath.basename(manager.latest_checkpoint) == "ckpt-2"  # default path
        # restore(keys={name: index}): the reader's read_slices, or one read per piece.
        parts = await manager.restore(keys={"w": (slice(1, 3),), "b": None})
        assert parts["w"].tolist() == (w * 2)[1:3].tolist()
        assert parts["b"].tolist() == [1.0, 1.0]
        with pytest.raises(KeyError):  # the reader's own error, not an exception group
            await manager.restore(keys={"missing": None})


# -- ReaderBase.read_slices and the read_slices helper -----------------------------------


class InheritingReader(ReaderBase):
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.prefix = "p"
        self._arrays = arrays

    def keys(self) -> list[str]:
        return sorted(self._arrays)

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        array = self._arrays[key]
        return array if index is None else array[index]


@pytest.mark.anyio
async def test_read_slices_defaults_to_one_read_per_piece() -> None:
    arrays = {"a": np.arange(10), "b": np.arange(6).reshape(2, 3)}
    bare = BareReader("p", "p.npz", arrays)
    pieces: dict[str, Index] = {"b": 1, "a": (slice(2, 5),)}
    for reader in (InheritingReader(arrays), bare):
        out = await read_slices(reader, pieces)  # type: ignore[arg-type]
        assert list(out) == ["b", "a"]  # in the order asked
        assert out["a"].tolist() == [2, 3, 4]
        assert out["b"].tolist() == [3, 4, 5]
    assert sorted(bare.reads, key=str) == sorted([("a", (slice(2, 5),)), ("b", 1)], key=str)
    async with InheritingReader(arrays) as reader:  # async with, from the base class
        whole = await reader.read_slices({"a": None})
    assert whole["a"].tolist() == list(range(10))


def test_key_view_defaults_to_keys() -> None:
    """A reader without ``key_view`` (bare or inheriting) is listed through ``keys()``."""
    arrays = {"b": np.arange(2), "a": np.arange(3)}
    for reader in (InheritingReader(arrays), BareReader("p", "p.npz", arrays)):
        assert list(key_view(reader)) == ["a", "b"]  # type: ignore[arg-type]
