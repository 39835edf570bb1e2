"""How files are uploaded to S3 (s3fs): from the caller's buffers, in one PUT or in parts sent
concurrently, retried as a whole with the bytes sent again. Against the moto server of
``tests/servers.py``; the request body is property-tested on its own."""

from __future__ import annotations

import errno
import io
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import RemoteBucket

import anyckpt
import anyckpt.storage
import anyckpt.storage.s3
from anyckpt.storage import RetryPolicy, Storage
from anyckpt.storage.s3 import GatherBody, S3Writer, slice_views

# -- the request body ----------------------------------------------------------------------

_chunks = st.lists(st.binary(max_size=40), max_size=8)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(-1, 60)),
        st.tuples(st.just("seek"), st.integers(0, 200), st.sampled_from([0, 1, 2])),
        st.tuples(st.just("readinto"), st.integers(0, 60)),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(chunks=_chunks, ops=_ops)
def test_gather_body_reads_like_one_bytes_file(chunks: list[bytes], ops: list[Any]) -> None:
    body = GatherBody([memoryview(c) for c in chunks])
    expected = io.BytesIO(b"".join(chunks))
    assert body.readable()
    assert body.seekable()
    for op in ops:
        if op[0] == "read":
            assert body.read(op[1]) == expected.read(op[1])
        elif op[0] == "readinto":
            mine, theirs = bytearray(op[1]), bytearray(op[1])
            assert body.readinto(mine) == expected.readinto(theirs)
            assert mine == theirs
        else:
            offset = op[1] - (100 if op[2] else 0)  # SEEK_CUR / SEEK_END: either direction
            try:
                want = expected.seek(offset, op[2])
            except ValueError:
                with pytest.raises(ValueError, match="negative seek"):
                    body.seek(offset, op[2])
                continue
            assert body.seek(offset, op[2]) == want
        assert body.tell() == expected.tell()
    assert body.read() == expected.read()


@settings(max_examples=300, deadline=None)
@given(chunks=_chunks, data=st.data())
def testslice_views_is_a_slice_of_the_concatenation(chunks: list[bytes], data: Any) -> None:
    whole = b"".join(chunks)
    start = data.draw(st.integers(0, len(whole)))
    stop = data.draw(st.integers(start, len(whole)))
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + len(c))
    views = slice_views([memoryview(c) for c in chunks], starts, start, stop)
    assert b"".join(views) == whole[start:stop]
    assert all(v.nbytes for v in views)


def test_gather_body_copies_nothing_before_it_is_read() -> None:
    buffer = bytearray(b"abcdef")
    body = GatherBody([memoryview(buffer)])
    buffer[0:1] = b"X"  # the body reads the buffer itself, when asked
    assert body.read() == b"Xbcdef"


# -- uploads to the moto server ------------------------------------------------------------


def _storage(bucket: RemoteBucket, name: str) -> tuple[Storage, str]:
    storage, path = Storage.from_url(f"{bucket.url}/{name}", bucket.storage_options)
    storage.retry = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)
    return storage, path


def _pieces() -> list[Any]:
    rng = np.random.default_rng(7)
    return [
        b"header",
        rng.integers(0, 255, 3 << 20, dtype=np.uint8),
        np.zeros((0, 4), dtype=np.float32),  # empty: nothing to send
        rng.standard_normal((700, 1024), dtype=np.float32),  # 2.7 MiB, not a byte view
        np.arange(5, dtype=np.int16)[::-1].copy(),
        b"trailer",
    ]


def _expected(pieces: list[Any]) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) if memoryview(p).nbytes else b"" for p in pieces)


def test_small_file_is_one_put(s3_bucket: RemoteBucket) -> None:
    storage, path = _storage(s3_bucket, "one")
    writer = storage.open_writer(path)
    assert isinstance(writer, S3Writer)
    pieces = _pieces()
    for piece in pieces:
        writer.write(piece)
    assert not s3_bucket.filesystem().exists(path)  # nothing sent before commit
    writer.commit()
    raw = s3_bucket.filesystem()
    assert raw.cat_file(path) == _expected(pieces)
    assert "-" not in raw.info(path)["ETag"]  # a plain PUT, not a multipart upload


@pytest.mark.parametrize("part_mib", [5, 6])
def test_big_file_goes_in_concurrent_parts(
    s3_bucket: RemoteBucket, monkeypatch: pytest.MonkeyPatch, part_mib: int
) -> None:
    monkeypatch.setattr(anyckpt.storage.s3, "S3_SINGLE_PUT_MAX", 1 << 20)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_SIZE", part_mib << 20)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_CONCURRENCY", 2)
    storage, path = _storage(s3_bucket, "parts")
    pieces = _pieces() * 2  # 11.4 MiB: parts end inside tensors
    writer = storage.open_writer(path)
    writer.write_many([memoryview(p) for p in pieces])  # type: ignore[attr-defined]
    writer.commit()
    raw = s3_bucket.filesystem()
    expected = _expected(pieces)
    assert raw.cat_file(path) == expected
    parts = -(-len(expected) // (part_mib << 20))
    assert raw.info(path)["ETag"].strip('"').endswith(f"-{parts}")
    assert raw.list_multipart_uploads(s3_bucket.name) == []


def test_parts_are_sent_while_writing(
    s3_bucket: RemoteBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(anyckpt.storage.s3, "S3_SINGLE_PUT_MAX", 1 << 20)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_SIZE", 5 << 20)
    storage, path = _storage(s3_bucket, "streamed")
    writer = storage.open_writer(path)
    assert isinstance(writer, S3Writer)
    pieces = [np.full(3 << 20, i, dtype=np.uint8) for i in range(5)]
    for piece in pieces:
        writer.write(piece)
    # Two 5 MiB parts are on their way (or sent); only the last 5 MiB are still held.
    assert len(writer._parts) == 3
    assert writer._size == 0
    raw = s3_bucket.filesystem()
    assert not raw.exists(path)
    writer.commit()
    assert raw.cat_file(path) == b"".join(p.tobytes() for p in pieces)
    assert raw.info(path)["ETag"].strip('"').endswith("-3")
    assert raw.list_multipart_uploads(s3_bucket.name) == []


def test_failed_part_aborts_the_upload(
    s3_bucket: RemoteBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(anyckpt.storage.s3, "S3_SINGLE_PUT_MAX", 1 << 20)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_SIZE", 5 << 20)
    original = S3Writer._call
    calls: list[str] = []

    async def failing(self: S3Writer, method: str, **kwargs: Any) -> Any:
        calls.append(method)
        if method == "upload_part" and kwargs["PartNumber"] == 2:
            raise PermissionError(errno.EACCES, "denied")  # permanent: not retried
        return await original(self, method, **kwargs)

    monkeypatch.setattr(S3Writer, "_call", failing)
    storage, path = _storage(s3_bucket, "failed")
    storage.write_bytes(path, b"the previous version")
    writer = storage.open_writer(path)
    writer.write(bytes(12 << 20))
    with pytest.raises(PermissionError):
        writer.commit()
    writer.abort()
    raw = s3_bucket.filesystem()
    assert raw.cat_file(path) == b"the previous version"
    assert raw.list_multipart_uploads(s3_bucket.name) == []
    assert calls.count("abort_multipart_upload") == 1
    assert "complete_multipart_upload" not in calls


@pytest.mark.parametrize("single_put_max", [64 << 20, 1 << 20], ids=["put", "multipart"])
def test_transient_failure_sends_every_byte_again(
    s3_bucket: RemoteBucket, monkeypatch: pytest.MonkeyPatch, single_put_max: int
) -> None:
    monkeypatch.setattr(anyckpt.storage.s3, "S3_SINGLE_PUT_MAX", single_put_max)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_SIZE", 5 << 20)
    original = S3Writer._call
    failures: list[str] = []

    async def flaky(self: S3Writer, method: str, **kwargs: Any) -> Any:
        if method in {"put_object", "upload_part"} and not failures:
            body = kwargs["Body"]
            body.read(1000)  # a body half sent, then the connection dropped
            failures.append(method)
            raise OSError(errno.ECONNRESET, "connection reset")
        return await original(self, method, **kwargs)

    monkeypatch.setattr(S3Writer, "_call", flaky)
    storage, path = _storage(s3_bucket, "retried")
    pieces = _pieces() * 2
    writer = storage.open_writer(path)
    for piece in pieces:
        writer.write(piece)
    writer.commit()
    assert len(failures) == 1
    assert s3_bucket.filesystem().cat_file(path) == _expected(pieces)
    assert s3_bucket.filesystem().list_multipart_uploads(s3_bucket.name) == []


def test_sharded_save_round_trip(s3_bucket: RemoteBucket) -> None:
    rng = np.random.default_rng(3)
    tensors = {f"w{i}": rng.standard_normal(300_000 + i, dtype=np.float32) for i in range(8)}
    tensors["names"] = np.array([b"a", b"bc"], dtype=object)
    prefix = f"{s3_bucket.url}/sharded/ckpt"
    files = anyckpt.sync.save(
        prefix, tensors, options={"num_shards": 3}, storage_options=s3_bucket.storage_options
    )
    assert len(files) == 4
    assert all(f.startswith(f"{prefix}.") for f in files), files  # s3://, as given
    loaded = anyckpt.sync.load(prefix, storage_options=s3_bucket.storage_options)
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_failed_part_is_raised_by_a_later_write(
    s3_bucket: RemoteBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(anyckpt.storage.s3, "S3_SINGLE_PUT_MAX", 1 << 20)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_SIZE", 5 << 20)
    monkeypatch.setattr(anyckpt.storage.s3, "S3_PART_CONCURRENCY", 1)
    original = S3Writer._call

    async def failing(self: S3Writer, method: str, **kwargs: Any) -> Any:
        if method == "upload_part":
            raise PermissionError(errno.EACCES, "denied")
        return await original(self, method, **kwargs)

    monkeypatch.setattr(S3Writer, "_call", failing)
    storage, path = _storage(s3_bucket, "failed-early")
    writer = storage.open_writer(path)
    writer.write(bytes(5 << 20))  # part 1 goes out, and fails
    with pytest.raises(PermissionError):
        writer.write(bytes(5 << 20))  # part 2 waits for part 1's slot: its error surfaces
    writer.abort()
    raw = s3_bucket.filesystem()
    assert not raw.exists(path)
    assert raw.list_multipart_uploads(s3_bucket.name) == []
