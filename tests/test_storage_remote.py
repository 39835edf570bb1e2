"""The storage layer and the public API against every kind of store, under asyncio and trio.

Stores: fsspec's ``memory://``, local disk, S3 (a moto server on 127.0.0.1, through s3fs) and
GCS (gcp-storage-emulator on 127.0.0.1, through gcsfs); see ``tests/servers.py``. Each test gets
an empty "directory" of its own. ``Store.raw`` is a second filesystem (for S3 and GCS: another
instance, without a listings cache) standing for another process that looks at, or changes, the
store behind anyckpt's back.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from servers import RemoteBucket

import anyckpt
from anyckpt.formats.v2 import data_path, index_path
from anyckpt.storage import TEMP_MARKER, Storage

pytestmark = pytest.mark.anyio

STORES = ["memory", "local", "s3", "gcs"]
#: Bigger than one upload block on S3 (5 MiB, see servers.S3_BLOCK_SIZE) and GCS (gcsfs's
#: 5 MiB default), so both multipart (S3) and resumable (GCS) uploads run.
BIG_SHAPE = (1536, 1024)  # float32: 6 MiB


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Store(NamedTuple):
    kind: str
    base: str  # URL (or local path) of an empty directory for this test
    storage_options: dict[str, Any]
    raw: Any  # a filesystem to inspect or change the store with, as another process would

    def url(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def path(self, *parts: str) -> str:
        """The path of ``url(*parts)`` in the filesystem's own terms (what anyckpt returns)."""
        return str(self.raw._strip_protocol(self.url(*parts))).rstrip("/")

    def storage(self, *parts: str) -> tuple[Storage, str]:
        return Storage.from_url(self.url(*parts), self.storage_options)

    def objects(self) -> list[str]:
        """Every file under the test's directory, freshly listed."""
        base = self.path()
        if not self.raw.exists(base):
            return []
        return sorted(str(p) for p in self.raw.find(base))


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind = request.param
    if kind == "memory":
        base = f"memory://anyckpt-test-{uuid.uuid4().hex}"
        raw = fsspec.filesystem("memory")
        yield Store(kind, base, {}, raw)
        if raw.exists(base):
            raw.rm(base, recursive=True)
    elif kind == "local":
        base = str(tmp_path / "store")
        yield Store(kind, base, {}, LocalFileSystem())
    else:
        bucket: RemoteBucket = request.getfixturevalue(f"{kind}_bucket")
        yield Store(kind, f"{bucket.url}/run", bucket.storage_options, bucket.filesystem())


def _tensors() -> dict[str, Any]:
    rng = np.random.default_rng(1234)
    return {
        "layer/kernel": rng.standard_normal(BIG_SHAPE, dtype=np.float32),
        "layer/bias": np.arange(-3, 4, dtype=np.int64),
        "names": np.array(["alpha", "", "βeta", "x" * 300]),
        "step": np.int64(42),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "zz/last": np.array([[1.5, -2.5]], dtype=np.float64),
    }


def _assert_same(loaded: dict[str, np.ndarray], tensors: dict[str, Any]) -> None:
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        expected = np.asarray(value)
        if expected.dtype.kind == "U":
            assert loaded[key].shape == expected.shape
            assert loaded[key].tolist() == [s.encode() for s in expected.tolist()], key
        else:
            assert loaded[key].dtype == expected.dtype, key
            np.testing.assert_array_equal(loaded[key], expected, err_msg=key)


# -- save and load -------------------------------------------------------------------------


async def test_save_load_round_trip(store: Store) -> None:
    tensors = _tensors()
    prefix = store.url("ckpt", "model-1")
    files = await anyckpt.save(prefix, tensors, storage_options=store.storage_options)

    p = store.path("ckpt", "model-1")
    # The files as the prefix was given: a URL keeps its scheme (s3://bucket/...).
    assert files == [data_path(prefix, 0, 1), index_path(prefix)]
    assert all(f.startswith(store.base) for f in files)
    # Exactly these objects exist: no temporary or partial upload is left over.
    assert store.objects() == sorted([data_path(p, 0, 1), index_path(p)])
    assert store.raw.size(data_path(p, 0, 1)) > np.prod(BIG_SHAPE) * 4

    loaded = await anyckpt.load(prefix, storage_options=store.storage_options)
    _assert_same(loaded, tensors)
    some = await anyckpt.load(prefix, ["step", "names"], storage_options=store.storage_options)
    assert list(some) == ["step", "names"]
    assert some["step"] == 42


async def test_s3_big_file_took_a_multipart_upload(
    s3_bucket: RemoteBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files above S3_SINGLE_PUT_MAX go in parts of S3_PART_SIZE (S3's smallest: 5 MiB).
    monkeypatch.setattr(anyckpt.storage.s3, "S3_SINGLE_PUT_MAX", 5 << 20)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_SIZE", 5 << 20)
    prefix = f"{s3_bucket.url}/model-1"
    files = await anyckpt.save(prefix, _tensors(), storage_options=s3_bucket.storage_options)
    raw = s3_bucket.filesystem()
    assert files[0] == f"{prefix}.data-00000-of-00001"
    etag = raw.info(files[0])["ETag"].strip('"')
    # A multipart upload's ETag ends in "-<number of parts>": 6 MiB and more, in 5 MiB parts.
    assert etag.endswith("-2"), f"expected a 2-part upload, the ETag is {etag}"
    assert raw.list_multipart_uploads(s3_bucket.name) == []
    loaded = await anyckpt.load(prefix, storage_options=s3_bucket.storage_options)
    _assert_same(loaded, _tensors())


def test_sync_round_trip(store: Store) -> None:
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.array(["a", "bc"])}
    prefix = store.url("sync", "model-1")
    anyckpt.sync.save(prefix, tensors, storage_options=store.storage_options)
    _assert_same(anyckpt.sync.load(prefix, storage_options=store.storage_options), tensors)


async def test_open_and_ranged_reads(store: Store) -> None:
    matrix = np.arange(200 * 16, dtype=np.float32).reshape(200, 16)
    cube = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6)
    names = np.array(["a", "bb", "ccc", "dddd"])
    prefix = store.url("ckpt", "model-7")
    options = store.storage_options
    await anyckpt.save(prefix, {"m": matrix, "cube": cube, "names": names}, storage_options=options)

    async with anyckpt.open(prefix, storage_options=options) as reader:
        assert reader.keys() == ["cube", "m", "names"]
        assert reader.spec("m").shape == (200, 16)
        assert reader.spec("m").dtype == np.float32
        np.testing.assert_array_equal(await reader.read("m", index=(slice(10, 20),)), matrix[10:20])
        np.testing.assert_array_equal(
            await reader.read("m", index=(slice(199, 300),)), matrix[199:]
        )
        np.testing.assert_array_equal(await reader.read("m", index=5), matrix[5])
        np.testing.assert_array_equal(await reader.read("m", index=(slice(7, 7),)), matrix[7:7])
        # Several discontiguous runs of one tensor.
        np.testing.assert_array_equal(
            await reader.read("cube", index=(slice(1, 3), slice(2, 4))), cube[1:3, 2:4]
        )
        np.testing.assert_array_equal(await reader.read("cube", index=(2, 4)), cube[2, 4])
        assert (await reader.read("names", index=(slice(1, 3),))).tolist() == [b"bb", b"ccc"]
        files = reader.files()

    p = store.path("ckpt", "model-7")
    assert files == [data_path(p, 0, 1), index_path(p)]
    for path in files:
        assert store.raw.exists(path), path
    assert store.objects() == sorted(files)
    storage, directory = store.storage("ckpt")
    assert storage.listdir(directory) == sorted(f.rsplit("/", 1)[1] for f in files)
    assert not any(TEMP_MARKER in name for name in storage.listdir(directory))


# -- errors --------------------------------------------------------------------------------


async def test_missing_checkpoint_is_not_found(store: Store) -> None:
    options = store.storage_options
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        await anyckpt.load(store.url("nowhere", "model-1"), storage_options=options)
    await anyckpt.save(store.url("ckpt", "model-1"), {"x": np.ones(3)}, storage_options=options)
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        await anyckpt.load(store.url("ckpt", "model-2"), storage_options=options)
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        await anyckpt.open(store.url("ckpt", "model"), storage_options=options)


async def test_deleted_data_file_is_not_found(store: Store) -> None:
    prefix = store.url("ckpt", "model-1")
    options = store.storage_options
    await anyckpt.save(prefix, {"x": np.ones(3)}, storage_options=options)
    storage, directory = store.storage("ckpt")
    assert len(storage.listdir(directory)) == 2  # a listing, as a manager would take
    store.raw.rm_file(data_path(store.path("ckpt", "model-1"), 0, 1))  # another process

    with pytest.raises(anyckpt.CheckpointNotFoundError) as info:
        await anyckpt.load(prefix, storage_options=options)
    assert info.value.path is not None
    assert info.value.path.endswith(".data-00000-of-00001")


@pytest.mark.parametrize("keep", [0.5, 0.999])
async def test_truncated_data_file_is_corrupt(store: Store, keep: float) -> None:
    prefix = store.url("ckpt", "model-1")
    options = store.storage_options
    tensors = {"a": np.arange(1000, dtype=np.float32), "b": np.arange(1000, dtype=np.int64)}
    await anyckpt.save(prefix, tensors, storage_options=options)
    storage, directory = store.storage("ckpt")
    assert len(storage.listdir(directory)) == 2  # a listing, as a manager would take
    data = data_path(store.path("ckpt", "model-1"), 0, 1)
    whole = store.raw.cat_file(data)
    store.raw.pipe_file(data, whole[: int(len(whole) * keep)])  # truncated behind our back

    with pytest.raises(anyckpt.CorruptCheckpointError) as info:
        await anyckpt.load(prefix, storage_options=options)
    assert info.value.path is not None
    assert info.value.path.endswith(".data-00000-of-00001")
    async with anyckpt.open(prefix, storage_options=options) as reader:
        # "a" (the first 4000 bytes) is intact; "b" lies (partly) past the new end.
        np.testing.assert_array_equal(await reader.read("a"), tensors["a"])
        with pytest.raises(anyckpt.CorruptCheckpointError):
            await reader.read("b", index=(slice(990, 1000),))


async def test_corrupted_data_fails_its_checksum(store: Store) -> None:
    prefix = store.url("model-1")
    options = store.storage_options
    await anyckpt.save(prefix, {"a": np.arange(100, dtype=np.int32)}, storage_options=options)
    data = data_path(store.path("model-1"), 0, 1)
    damaged = bytearray(store.raw.cat_file(data))
    damaged[17] ^= 0xFF
    store.raw.pipe_file(data, bytes(damaged))
    with pytest.raises(anyckpt.CorruptCheckpointError, match="checksum"):
        await anyckpt.load(prefix, storage_options=options)
    loaded = await anyckpt.load(prefix, verify=False, storage_options=options)
    assert loaded["a"][4] != 4


# -- the storage layer ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 6 << 20], ids=["small", "multi-block"])
def test_aborted_write_leaves_nothing(store: Store, size: int) -> None:
    storage, directory = store.storage("dir")
    storage.makedirs(directory)
    path = f"{directory}/obj"
    writer = storage.open_writer(path)
    writer.write(b"x" * size)
    writer.abort()
    del writer
    gc.collect()  # a finalizer must not upload what was aborted
    assert not storage.exists(path)
    assert not store.raw.exists(path)
    assert store.objects() == []
    assert storage.listdir(directory) == []
    if store.kind == "s3":
        assert store.raw.list_multipart_uploads(path.split("/")[0]) == []


@pytest.mark.parametrize("size", [100, 6 << 20], ids=["small", "multi-block"])
def test_aborted_overwrite_keeps_the_old_file(store: Store, size: int) -> None:
    storage, directory = store.storage("dir")
    storage.makedirs(directory)
    path = f"{directory}/obj"
    storage.write_bytes(path, b"old contents")
    writer = storage.open_writer(path)
    writer.write(b"y" * size)
    writer.abort()
    del writer
    gc.collect()
    assert store.raw.cat_file(path) == b"old contents"
    assert storage.read_bytes(path) == b"old contents"
    assert store.objects() == [path]


def test_committed_write_replaces_the_file(store: Store) -> None:
    storage, directory = store.storage("dir")
    storage.makedirs(directory)
    path = f"{directory}/obj"
    storage.write_bytes(path, b"first version, longer")
    assert storage.read_bytes(path) == b"first version, longer"
    writer = storage.open_writer(path)
    writer.write(b"second")
    writer.write(np.arange(3, dtype=np.uint16).data)  # a non-byte memoryview
    writer.commit()
    expected = b"second" + np.arange(3, dtype=np.uint16).tobytes()
    assert storage.read_bytes(path) == expected
    assert store.raw.cat_file(path) == expected
    reader = storage.open_reader(path)
    try:
        assert reader.size == len(expected)
        assert reader.read(2, 4) == b"cond"
        buf = bytearray(3)
        reader.read_into(len(expected) - 3, buf)
        assert bytes(buf) == expected[-3:]
        with pytest.raises(anyckpt.CorruptCheckpointError):
            reader.read(len(expected) - 2, 3)
    finally:
        reader.close()
    assert store.objects() == [path]


def test_listdir_is_fresh_after_writes_and_deletes(store: Store) -> None:
    storage, directory = store.storage("dir")
    assert storage.listdir(directory) == []
    storage.makedirs(directory)
    storage.write_bytes(f"{directory}/a", b"1")
    assert storage.listdir(directory) == ["a"]
    storage.write_bytes(f"{directory}/b", b"22")
    assert storage.listdir(directory) == ["a", "b"]
    assert storage.remove(f"{directory}/a") is True
    assert storage.listdir(directory) == ["b"]
    assert storage.remove(f"{directory}/a") is False  # already gone
    assert storage.listdir(directory) == ["b"]
    assert not storage.exists(f"{directory}/a")

    # Another process adds, deletes and rewrites files after our last listing.
    store.raw.pipe_file(f"{directory}/c", b"333")
    store.raw.rm_file(f"{directory}/b")
    assert storage.listdir(directory) == ["c"]
    store.raw.pipe_file(f"{directory}/d", b"4444")
    store.raw.pipe_file(f"{directory}/c", b"3")
    assert storage.exists(f"{directory}/d")
    assert storage.read_bytes(f"{directory}/d") == b"4444"
    assert storage.read_bytes(f"{directory}/c") == b"3"
    store.raw.rm_file(f"{directory}/d")
    assert not storage.exists(f"{directory}/d")
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        storage.read_bytes(f"{directory}/d")
    assert storage.listdir(directory) == ["c"]


def test_missing_file_is_not_found(store: Store) -> None:
    storage, directory = store.storage("dir")
    storage.makedirs(directory)
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        storage.open_reader(f"{directory}/missing")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{directory}/missing")
    assert storage.remove(f"{directory}/missing") is False
    assert storage.listdir(f"{directory}/missing-dir") == []


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 5000])
def test_read_bytes_with_a_limit(store: Store, size: int) -> None:
    """``read_bytes(max_size=...)`` returns a file up to the limit whole, and refuses one over
    it as corrupt, on every store: on object stores one ranged GET of one byte more than the
    limit (an empty object, on which S3 refuses any range, included)."""
    storage, directory = store.storage("limit")
    storage.makedirs(directory)
    data = bytes(range(256)) * 20
    path = f"{directory}/f"
    storage.write_bytes(path, data[:size])
    if size <= 100:
        assert storage.read_bytes(path, max_size=100) == data[:size]
    else:
        with pytest.raises(anyckpt.CorruptCheckpointError, match="more than the 100 allowed"):
            storage.read_bytes(path, max_size=100)
    assert storage.read_bytes(path) == data[:size]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{directory}/missing", max_size=100)
