"""S3 through s3fs: uploads from the caller's buffers (one PUT, or a multipart upload of
concurrent parts), conditional writes (``If-None-Match``/``If-Match``), unfinished multipart
uploads listed and aborted, and a client that gives up at once on an unreachable endpoint."""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import io
import posixpath
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import fsspec.asyn

from .base import FileWriter, Upload, WriterBase, bytes_view, conflict
from .fsspec_backend import Conditional, FsspecWriter, ObjectStoreBackend
from .remote_errors import remote_errors_as_ours, s3fs_fails_fast
from .retry import RetryPolicy, is_transient, logger

if TYPE_CHECKING:
    from typing_extensions import Buffer


#: Files up to this size go to S3 in one PUT; bigger ones in a multipart upload. One request
#: per file is the cheapest for the client and the server (no part to store, re-read and
#: join), and a sharded save already sends its files concurrently; the parts of a bigger
#: file are sent while it is written, concurrently. (S3 takes up to 5 GiB in one PUT.)
S3_SINGLE_PUT_MAX = 512 * 2**20
#: The part size of those multipart uploads (S3: at least 5 MiB; doubled every 1,000 parts).
S3_PART_SIZE = 64 * 2**20
#: Parts of one file in flight at once.
S3_PART_CONCURRENCY = 4


class GatherBody(io.RawIOBase):
    """Byte views back to back, as a read-only, seekable file: the body of one upload request,
    read from the caller's buffers (``read`` copies only the bytes it returns)."""

    def __init__(self, views: list[memoryview]) -> None:
        super().__init__()
        self._views = views
        self._starts = [0]
        for view in views:
            self._starts.append(self._starts[-1] + view.nbytes)
        self._size = self._starts[-1]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """As :class:`io.BytesIO`: a negative absolute position is an error, a relative one
        stops at the start."""
        if whence == io.SEEK_SET and offset < 0:
            raise ValueError(f"negative seek position {offset}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        chunks = slice_views(self._views, self._starts, self._pos, end)
        self._pos = end
        return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)

    def readinto(self, buffer: Buffer) -> int:
        view = bytes_view(buffer)
        data = self.read(view.nbytes)
        view[: len(data)] = data
        return len(data)


def slice_views(
    views: list[memoryview], starts: list[int], start: int, stop: int
) -> list[memoryview]:
    """The bytes ``start:stop`` of ``views`` back to back (``starts``: their offsets, and the
    total size last), as views of them."""
    out: list[memoryview] = []
    i = bisect.bisect_right(starts, start) - 1
    while start < stop:
        view = views[i]
        begin = start - starts[i]
        take = min(view.nbytes - begin, stop - start)
        if take > 0:
            out.append(view[begin : begin + take])
            start += take
        i += 1
    return out


class S3Writer(WriterBase):
    """S3 through s3fs: the buffers written are kept (not copied) and sent from there. A file
    of up to :data:`S3_SINGLE_PUT_MAX` bytes is uploaded on :meth:`commit` in one PUT; once
    a file grows past it, a multipart upload starts and each :data:`S3_PART_SIZE` bytes
    written are sent as a part (at most :data:`S3_PART_CONCURRENCY` in flight: ``write``
    waits for one to finish), then released. So at most about ``S3_SINGLE_PUT_MAX`` bytes are
    held (the caller's own buffers, except what a format made for the file: strings,
    compressed frames...).

    The requests go straight to s3fs's client, with s3fs's extra arguments (server-side
    encryption, requester pays...), and each try of a request reads its bytes from the start:
    the client library retries each request (rewinding its body), :class:`RetryPolicy` the
    PUT or each part as a whole. Nothing exists under the name before the upload completes; a
    multipart upload that fails or is aborted is aborted on the server. Integrity: the client
    sends the checksum its configuration asks for (botocore: a CRC32 of every request body by
    default, which S3 verifies; over plain http, a SHA-256 of the body in the signature too,
    unless ``config_kwargs={"s3": {"payload_signing_enabled": False}}``), and the V2 data
    file's own CRC32C of every tensor is verified when it is read."""

    def __init__(self, fs: Any, path: str, retry: RetryPolicy) -> None:
        self.path = path
        self._fs = fs
        self._retry = retry
        self._views: list[memoryview] = []  # written, not sent yet
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future[dict[str, Any]]] = []
        self._bucket, self._key, _ = fs.split_path(path)

    def write(self, data: Buffer) -> None:
        view = memoryview(data)
        if not view.nbytes:  # (an empty array's view, shaped (0, n), cannot be cast)
            return
        view = bytes_view(view)
        self._views.append(view)
        self._size += view.nbytes
        if self._upload_id is None and self._size > S3_SINGLE_PUT_MAX:
            out = self._retry.run(
                lambda: self._sync(self._call, "create_multipart_upload"), self._what(), self._fs
            )
            self._upload_id = str(out["UploadId"])
        if self._upload_id is not None:
            while self._size >= self._part_size():
                self._send_part(self._part_size())

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                self._retry.run(
                    lambda: self._sync(self._call, "put_object", Body=GatherBody(self._views)),
                    self._what(),
                    self._fs,
                )
            else:
                with remote_errors_as_ours(self._what(), self._fs):  # (parts' own errors)
                    if self._size:
                        self._send_part(self._size)
                    parts = [part.result() for part in self._parts]
                self._retry.run(
                    lambda: self._sync(
                        self._call,
                        "complete_multipart_upload",
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": parts},
                    ),
                    self._what(),
                    self._fs,
                )
                self._upload_id = None
        except BaseException:
            self.abort()
            raise
        finally:
            self._views = []
            self._fs.invalidate_cache(self.path)

    def abort(self) -> None:
        self._views = []
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return  # nothing was sent, or the upload completed
        for part in self._parts:
            part.cancel()
        concurrent.futures.wait(self._parts)
        with suppress(Exception):
            self._sync(self._call, "abort_multipart_upload", UploadId=upload_id)

    def _what(self) -> str:
        return f"writing {self._fs.unstrip_protocol(self.path)}"

    def _sync(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fsspec.asyn.sync(self._fs.loop, func, *args, **kwargs)

    def _part_size(self) -> int:
        # Doubled every 1,000 parts: S3 takes at most 10,000 per upload.
        return int(S3_PART_SIZE) << (len(self._parts) // 1000)

    def _send_part(self, size: int) -> None:
        """Send the first ``size`` bytes not sent yet as the next part (in the background);
        first wait for a free slot, and raise the error of a part that failed."""
        while True:
            pending = [p for p in self._parts if not p.done()]
            for part in self._parts:
                if part.done() and part.exception() is not None:
                    part.result()  # raises it
            if len(pending) < S3_PART_CONCURRENCY:
                break
            concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        starts = [0]
        for view in self._views:
            starts.append(starts[-1] + view.nbytes)
        views = slice_views(self._views, starts, 0, size)
        rest = slice_views(self._views, starts, size, self._size)
        self._views, self._size = rest, self._size - size
        number = len(self._parts) + 1
        self._parts.append(
            asyncio.run_coroutine_threadsafe(self._send(number, views), self._fs.loop)
        )

    async def _send(self, number: int, views: list[memoryview]) -> dict[str, Any]:
        """Upload one part, retried as a whole after transient failures."""
        attempt = 1
        while True:
            try:
                out = await self._call(
                    "upload_part",
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=GatherBody(views),
                )
                return {"PartNumber": number, "ETag": out["ETag"]}
            except Exception as exc:  # noqa: PERF203 - the loop is the retry
                if attempt >= self._retry.attempts or not is_transient(exc):
                    raise
                pause = self._retry.delay(attempt)
                logger.warning(
                    "%s, part %d, failed (%s: %s); retry %d of %d in %.3f s",
                    self._what(),
                    number,
                    type(exc).__name__,
                    exc,
                    attempt,
                    self._retry.attempts - 1,
                    pause,
                )
                await asyncio.sleep(pause)
                attempt += 1

    async def _call(self, method: str, **kwargs: Any) -> Any:
        """One request of s3fs's client on this object, its errors translated as s3fs's."""
        fs = self._fs
        await fs.set_session()
        client = await fs.get_s3(self._bucket)
        call = getattr(client, method)
        kwargs.update(Bucket=self._bucket, Key=self._key)
        try:
            return await call(**fs._get_s3_method_kwargs(call, **kwargs))
        except Exception as exc:
            from s3fs.errors import translate_boto_error

            error = translate_boto_error(exc)
            if error is exc:
                raise
            raise error from exc


def precondition_failed(exc: BaseException) -> bool:
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    return isinstance(response, dict) and (
        response.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}
        or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
    )


class S3Conditional(Conditional):
    """Conditional requests on S3 (s3fs): ``If-None-Match: *`` creates, ``If-Match: ETAG``
    replaces and deletes; versions are ETags."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return bytes(data), str(response["ETag"])

        return fsspec.asyn.sync(self.fs.loop, get)  # type: ignore[no-any-return]

    def create(self, path: str, data: bytes) -> str:
        out = self.fs.pipe_file(path, data, mode="create")
        return str(out["ETag"])

    def replace(self, path: str, data: bytes, version: str) -> str:
        try:
            out = self.fs.pipe_file(path, data, IfMatch=version)
        except FileNotFoundError:
            raise conflict(path, "replacing") from None
        except OSError as exc:
            if precondition_failed(exc):
                raise conflict(path, "replacing") from None
            raise
        return str(out["ETag"])

    def remove(self, path: str, version: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            raise conflict(path, "removing") from None
        except OSError as exc:
            if precondition_failed(exc):
                raise conflict(path, "removing") from None
            raise
        finally:
            self.fs.invalidate_cache(path)


def is_s3fs(fs: Any) -> bool:
    """An s3fs filesystem that has s3fs's client (not a wrapper or a test double)."""
    return hasattr(fs, "get_s3")


class S3Backend(ObjectStoreBackend):
    """S3 (s3fs): files uploaded by :class:`S3Writer`, retried as a whole; conditional
    requests; multipart uploads listed and aborted."""

    def __init__(self, fs: Any, retry: RetryPolicy, allow_symlinks: bool) -> None:
        super().__init__(fs, retry, allow_symlinks, S3Conditional(fs))
        self._client = is_s3fs(fs)
        if self._client:
            s3fs_fails_fast(fs)

    def open_writer(self, path: str, durable: bool) -> FileWriter:
        if not self._client:
            return FsspecWriter(self.fs, path, True)
        return S3Writer(self.fs, path, self.retry)

    def write_bytes(self, path: str, data: Buffer, durable: bool) -> None:
        if not self._client:
            super().write_bytes(path, data, durable)
            return
        writer = S3Writer(self.fs, path, self.retry)  # retries the upload as a whole itself
        writer.write(data)
        writer.commit()

    def list_uploads(self, directory: str) -> list[Upload]:
        if not self._client:
            return []
        bucket, key, _ = self.fs.split_path(directory)
        prefix = f"{key}/" if key else ""

        def call(method: str, **kwargs: Any) -> Any:
            return self.retrying(
                lambda: self.fs.call_s3(method, Bucket=bucket, **kwargs),
                f"listing uploads under {self.url(directory)}",
            )

        found: list[Upload] = []
        markers: dict[str, Any] = {}
        while True:
            page = call("list_multipart_uploads", Prefix=prefix, **markers)
            for item in page.get("Uploads", []):
                name = str(item["Key"])[len(prefix) :]
                if not name or "/" in name:
                    continue
                size = 0
                part_marker: dict[str, Any] = {}
                while True:
                    parts = call(
                        "list_parts", Key=item["Key"], UploadId=item["UploadId"], **part_marker
                    )
                    size += sum(int(p.get("Size", 0)) for p in parts.get("Parts", []))
                    if not parts.get("IsTruncated"):
                        break
                    part_marker = {"PartNumberMarker": parts["NextPartNumberMarker"]}
                started = item.get("Initiated")
                found.append(
                    Upload(
                        posixpath.join(directory, name),
                        str(item["UploadId"]),
                        started.timestamp() if hasattr(started, "timestamp") else None,
                        size,
                    )
                )
            if not page.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }
        return sorted(found, key=lambda u: (u.path, u.initiated or 0.0))

    def abort_upload(self, upload: Upload) -> bool:
        """Abort an unfinished multipart upload (its parts are deleted); False if it is gone."""
        bucket, key, _ = self.fs.split_path(upload.path)
        try:
            self.retrying(
                lambda: self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id
                ),
                f"aborting the upload of {self.url(upload.path)}",
            )
        except FileNotFoundError:  # NoSuchUpload: completed or aborted meanwhile
            return False
        return True
