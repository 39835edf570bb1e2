"""Fault injection below anyckpt, at three levels:

* :class:`FaultFileSystem` (``faultfs://``): an fsspec filesystem wrapping memory://, counting
  every operation anyckpt makes (open, write, close/flush, rename, delete, list, read, stat,
  mkdir) and failing the k-th one;
* :class:`FaultyOs`: the ``os`` module as anyckpt's local backend and lock see it (installed
  in every module of the seam by ``os_seam.patch_os``; open,
  write/writev, fsync, rename/replace, link, unlink, listdir, preadv, ...);
* :class:`S3Faults`: a botocore ``before-send`` hook on the s3fs client, answering the k-th HTTP
  request to the S3 test server with a real S3 error response (503 SlowDown, 500, 403) or a
  timeout, so s3fs and botocore parse and translate it as they would from AWS;
* :class:`GCSFaults`: the aiohttp session of a gcsfs filesystem, answering the k-th HTTP
  request to the GCS emulator, unsent, with a GCS JSON API error response (429, 500, 502, 503,
  403) or a read timeout or connection reset, so gcsfs translates it as it would from GCS.

A :class:`FaultPlan` counts operations while armed and fails the k-th with an error from
:data:`ERRORS`; the same operation (same op, same file) keeps failing for ``times`` attempts.
"""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem
from fsspec.utils import stringify_path

from anyckpt.storage import TEMP_MARKER


class InjectedError(Exception):
    """Mixed into every injected error, to find it in the chain the caller gets."""


#: In the message of injected S3 error responses (s3fs builds its own exception from them).
INJECTED_MARK = "(injected)"


def _s3_error(code: str, status: int, message: str) -> OSError:
    """What s3fs raises for an S3 error response (its own translation of botocore's error)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )
    translated = translate_boto_error(error)
    assert isinstance(translated, OSError)
    return translated


def _gcs_error(status: int, reason: str, message: str) -> BaseException:
    """What gcsfs raises for a GCS JSON API error response (its own translation)."""
    from gcsfs.retry import validate_response

    try:
        validate_response(status, _gcs_error_body(status, reason, message), "b/{}/o", ["x"])
    except Exception as exc:
        return exc
    raise AssertionError(f"gcsfs accepted status {status}")


def _gcs_error_body(status: int, reason: str, message: str) -> bytes:
    error = {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}
    return json.dumps({"error": error}).encode()


def _mark(exc: BaseException) -> BaseException:
    """Tag an error as injected (a subclass of its own type with InjectedError mixed in)."""
    cls = type(exc)
    marked = type(f"Injected{cls.__name__}", (cls, InjectedError), {})
    try:
        new = marked(*exc.args)
    except Exception:  # a constructor that does not take its args back (gcsfs's HttpError)
        new = marked.__new__(marked)
        new.__dict__.update(exc.__dict__)
        new.args = exc.args
    new.__cause__ = exc.__cause__
    return new


#: Errors as the GCS JSON API sends them: (status, reason, message); None for no answer (a read
#: timeout, a reset connection: the entries of the same name in ERRORS).
GCS_HTTP_ERRORS: dict[str, tuple[int, str, str] | None] = {
    "GCS-503-backendError": (503, "backendError", "Backend Error"),
    "GCS-429-rateLimitExceeded": (
        429,
        "rateLimitExceeded",
        "The rate of requests exceeds the limit.",
    ),
    "GCS-500-internalError": (500, "internalError", "Internal Error"),
    "GCS-502-badGateway": (502, "badGateway", "Bad Gateway"),
    "GCS-403-forbidden": (403, "forbidden", "The caller does not have storage.objects access."),
    "timeout": None,
    "ECONNRESET": None,
}

#: Realistic errors by name, and whether anyckpt should retry them (object stores only).
ERRORS: dict[str, tuple[Callable[[], BaseException], bool]] = {
    "ENOSPC": (lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), False),
    "EIO": (lambda: OSError(errno.EIO, os.strerror(errno.EIO)), False),
    "EACCES": (lambda: PermissionError(errno.EACCES, os.strerror(errno.EACCES)), False),
    "EROFS": (lambda: OSError(errno.EROFS, os.strerror(errno.EROFS)), False),
    "timeout": (lambda: TimeoutError("the operation timed out"), True),
    "ECONNRESET": (
        lambda: ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)),
        True,
    ),
    "S3-503-SlowDown": (
        lambda: _s3_error("SlowDown", 503, "Please reduce your request rate."),
        True,
    ),
    "S3-500-InternalError": (
        lambda: _s3_error("InternalError", 500, "We encountered an internal error."),
        True,
    ),
    "S3-403-AccessDenied": (lambda: _s3_error("AccessDenied", 403, "Access Denied"), False),
    **{
        name: ((lambda spec=spec: _gcs_error(*spec)), spec[0] != 403)
        for name, spec in GCS_HTTP_ERRORS.items()
        if spec is not None
    },
}


def make_error(name: str) -> BaseException:
    return _mark(ERRORS[name][0]())


#: Set on an error a client library raised while reading an injected answer, when nothing in
#: the error itself tells (gcsfs raises a bare ``requests.exceptions.ProxyError()`` for 502).
_INJECTED_ATTR = "anyckpt_injected"


def is_injected(exc: BaseException) -> bool:
    """Whether ``exc``, or anything it was raised from or groups, is an injected error."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if (
            isinstance(e, InjectedError)
            or INJECTED_MARK in str(e)
            or getattr(e, _INJECTED_ATTR, False)
        ):
            return True
        todo.extend(getattr(e, "exceptions", ()))
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


def _normal(path: str) -> str:
    """A path without its temporary-file suffix: a retry writes a new temporary file, but it is
    the same operation."""
    return str(path).split(TEMP_MARKER, 1)[0]


@dataclass
class FaultPlan:
    """Counts operations while armed; fails the ``at``-th with ``error`` (a name in ERRORS),
    and the same operation again until it has failed ``times`` times."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    armed: bool = False
    count: int = 0
    at: int | None = None
    error: str = "EIO"
    times: int = 1
    fired: int = 0
    target: tuple[str, str] | None = None
    log: list[tuple[str, str]] = field(default_factory=list)
    only: Callable[[str], bool] = lambda path: True
    ops: frozenset[str] | None = None  # count only these operations (None: all)
    fired_at: int = 0  # the count when it last fired

    def arm(self, at: int | None, error: str = "EIO", times: int = 1) -> None:
        with self.lock:
            self.armed, self.count, self.at, self.error, self.times = True, 0, at, error, times
            self.fired, self.target = 0, None
            self.log = []

    def disarm(self) -> None:
        with self.lock:
            self.armed, self.at, self.target = False, None, None

    def hit(self, op: str, path: Any) -> None:
        path = os.fspath(path) if not isinstance(path, str) else path
        if not self.only(path) or (self.ops is not None and op not in self.ops):
            return
        with self.lock:
            if not self.armed:
                return
            self.count += 1
            self.log.append((op, path))
            key = (op, _normal(path))
            if self.at is not None and self.fired < self.times:
                if self.target is None and self.count == self.at:
                    self.target = key
                if self.target == key:
                    self.fired += 1
                    self.fired_at = self.count
                    raise make_error(self.error)


# -- an fsspec wrapper over memory:// --------------------------------------------------------

#: The plan of each ``faultfs://`` filesystem, by the ``plan`` storage option.
PLANS: dict[str, FaultPlan] = {}


class _FaultWriteFile(io.RawIOBase):
    """A file being written through FaultFileSystem: write, flush and close are operations, and
    the bytes reach the store only when close() succeeds (like an upload completing)."""

    def __init__(self, fs: FaultFileSystem, path: str) -> None:
        super().__init__()
        self.fs, self.path = fs, path
        self._buffer = io.BytesIO()
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.fs.plan.hit("write", self.path)
        return self._buffer.write(data)

    def flush(self) -> None:
        if not self._done and not self.closed:
            self.fs.plan.hit("flush", self.path)

    def close(self) -> None:
        if not self._done:
            self.fs.plan.hit("close", self.path)  # may fail: then nothing becomes visible
            self._done = True
            self.fs.target.pipe_file(self.path, self._buffer.getvalue())
        super().close()

    def discard(self) -> None:
        self._done = True
        super().close()


class FaultFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """``faultfs://PATH``: memory:// (its own store) with every operation counted by the
    FaultPlan named by the ``plan`` option. ``object_store=True`` makes anyckpt treat it as an
    object store (files written in place, visible on close); False (default) as a plain
    filesystem (temporary file, then rename)."""

    protocol = "faultfs"
    root_marker = "/"

    def __init__(self, plan: str = "default", object_store: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = PLANS.setdefault(plan, FaultPlan())
        self.target = _FaultStore()
        self.anyckpt_object_store = object_store

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = stringify_path(path).removeprefix("faultfs://")
        return "/" + text.strip("/") if text.strip("/") else "/"

    def unstrip_protocol(self, name: str) -> str:
        return f"faultfs://{name.lstrip('/')}"

    # -- writes --
    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "w" in mode or "x" in mode:
            self.plan.hit("open", path)
            if "x" in mode and self.target.exists(path):
                raise FileExistsError(path)
            return _FaultWriteFile(self, path)
        self.plan.hit("read", path)
        return self.target._open(path, mode, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self.plan.hit("put", path)
        self.target.pipe_file(path, value, mode=mode)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        self.plan.hit("rename", path2)
        self.target.mv(path1, path2)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        self.plan.hit("delete", path)
        self.target.rm_file(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        path = self._strip_protocol(path)
        self.plan.hit("mkdir", path)
        self.target.makedirs(path, exist_ok=exist_ok)

    # -- reads --
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        self.plan.hit("list", path)
        return self.target.ls(path, detail=detail)

    def info(self, path: str, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        self.plan.hit("stat", path)
        return self.target.info(path)

    def exists(self, path: str, **kwargs: Any) -> bool:
        path = self._strip_protocol(path)
        self.plan.hit("stat", path)
        return bool(self.target.exists(path))

    def size(self, path: str) -> int:
        path = self._strip_protocol(path)
        self.plan.hit("stat", path)
        return int(self.target.size(path))

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> Any:
        path = self._strip_protocol(path)
        self.plan.hit("read", path)
        return self.target.cat_file(path, start=start, end=end)

    def invalidate_cache(self, path: str | None = None) -> None:
        pass


class _FaultStore(MemoryFileSystem):
    """The memory behind faultfs://: a store of its own, shared by all faultfs instances."""

    protocol = "faultstore"
    store: dict[str, Any] = {}  # noqa: RUF012 - MemoryFileSystem's design
    pseudo_dirs: list[str] = [""]  # noqa: RUF012


fsspec.register_implementation("faultfs", FaultFileSystem, clobber=True)


def drop_tree(root: str) -> None:
    """Forget everything faultfs:// holds under ``root``."""
    root = FaultFileSystem._strip_protocol(root)
    for key in [k for k in _FaultStore.store if k == root or k.startswith(root + "/")]:
        del _FaultStore.store[key]
    _FaultStore.pseudo_dirs[:] = [
        d for d in _FaultStore.pseudo_dirs if not (d == root or d.startswith(root + "/"))
    ]


# -- local disk: the os of anyckpt.storage.local and anyckpt.lease ---------------------------


class FaultyOs:
    """``os`` as anyckpt's local I/O sees it (``os_seam.patch_os``): the calls that touch
    files under ``root`` are operations of ``plan`` (file descriptors are traced back to the
    path they opened)."""

    def __init__(self, real: Any, plan: FaultPlan, root: str) -> None:
        self._real = real
        self._plan = plan
        self._root = root.rstrip("/") + "/"
        self._fds: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _mine(self, path: Any) -> bool:
        return str(os.fspath(path)).startswith(self._root)

    def _hit(self, op: str, path: Any) -> None:
        if path is not None and self._mine(path):
            self._plan.hit(op, os.fspath(path))

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        self._hit("open", path)
        fd = int(self._real.open(path, flags, mode, **kwargs))
        if self._mine(path):
            self._fds[fd] = os.fspath(path)
        return fd

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self._real.close(fd)

    def write(self, fd: int, data: Any) -> int:
        self._hit("write", self._fds.get(fd))
        return int(self._real.write(fd, data))

    def writev(self, fd: int, buffers: Any) -> int:
        self._hit("write", self._fds.get(fd))
        return int(self._real.writev(fd, buffers))

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self._hit("write", self._fds.get(fd))
        return int(self._real.pwrite(fd, data, offset))

    def ftruncate(self, fd: int, length: int) -> None:
        self._hit("write", self._fds.get(fd))
        self._real.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        self._hit("fsync", self._fds.get(fd, self._root))
        self._real.fsync(fd)

    def preadv(self, fd: int, buffers: Any, offset: int) -> int:
        self._hit("read", self._fds.get(fd))
        return int(self._real.preadv(fd, buffers, offset))

    def replace(self, src: Any, dst: Any) -> None:
        self._hit("rename", dst)
        self._real.replace(src, dst)

    def rename(self, src: Any, dst: Any) -> None:
        self._hit("rename", dst)
        self._real.rename(src, dst)

    def link(self, src: Any, dst: Any) -> None:
        self._hit("link", dst)
        self._real.link(src, dst)

    def unlink(self, path: Any) -> None:
        if self._real.path.lexists(path):
            self._hit("delete", path)
        self._real.unlink(path)

    remove = unlink

    def listdir(self, path: Any) -> list[str]:
        self._hit("list", path)
        return list(self._real.listdir(path))

    def stat(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        self._hit("stat", path)
        return self._real.stat(path, *args, **kwargs)


# -- S3: HTTP responses of the test server replaced by errors --------------------------------


_S3_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>injected</RequestId>"
    "</Error>"
)
#: Errors as the S3 server sends them: (status, code, message), or None for a timeout.
S3_HTTP_ERRORS: dict[str, tuple[int, str, str] | None] = {
    "S3-503-SlowDown": (503, "SlowDown", "Please reduce your request rate."),
    "S3-500-InternalError": (500, "InternalError", "We encountered an internal error."),
    "S3-403-AccessDenied": (403, "AccessDenied", "Access Denied"),
    "timeout": None,
}


class _RawBody:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, *args: Any) -> bytes:
        data, self._data = self._data, b""
        return data

    def at_eof(self) -> bool:
        return not self._data


class S3Faults:
    """Counts the HTTP requests an s3fs filesystem sends (``op`` is the S3 operation name) and
    answers the k-th with an S3 error response (or raises a read timeout) instead of sending
    it. Register with :meth:`install`; the plan's ``error`` names an entry of S3_HTTP_ERRORS."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._attached: list[tuple[Any, Any]] = []

    def handler(self, request: Any, **kwargs: Any) -> Any:
        from aiobotocore.awsrequest import AioAWSResponse
        from botocore.exceptions import ReadTimeoutError

        operation = str(kwargs.get("event_name", "")).rsplit(".", 1)[-1]
        try:
            self.plan.hit(operation, request.url)
        except InjectedError:
            spec = S3_HTTP_ERRORS[self.plan.error]
            if spec is None:
                injected = type("InjectedReadTimeoutError", (ReadTimeoutError, InjectedError), {})
                raise injected(endpoint_url=request.url) from None
            status, code, message = spec
            body = _S3_ERROR_BODY.format(code=code, message=f"{message} {INJECTED_MARK}").encode()
            headers = {"Content-Type": "application/xml", "Content-Length": str(len(body))}
            return AioAWSResponse(request.url, status, headers, _RawBody(body))
        return None

    def attach(self, fs: Any, bucket: str) -> None:
        """Send the requests of s3fs filesystem ``fs`` through the plan (fsspec caches one
        instance per thread: attach to the one anyckpt uses, ``manager.storage.fs``)."""
        if any(f is fs for f, _ in self._attached):
            return
        fs.ls(bucket, refresh=True)  # a client with an open HTTP session, which s3fs keeps
        client = fs.s3
        client.meta.events.register("before-send.s3", self.handler, unique_id="anyckpt-faults")
        self._attached.append((fs, client))

    def detach(self) -> None:
        for _, client in self._attached:
            client.meta.events.unregister("before-send.s3", unique_id="anyckpt-faults")
        self._attached.clear()


# -- GCS: HTTP requests of gcsfs answered by errors instead of the emulator ------------------


class _ErrorResponse:
    """An answer GCS could have sent, as gcsfs reads it (status, headers, body)."""

    def __init__(self, url: str, status: int, body: bytes) -> None:
        self.status = status
        self.headers = {"Content-Type": "application/json; charset=UTF-8"}
        self.request_info = url
        self._body = body

    async def read(self) -> bytes:
        return self._body

    async def __aenter__(self) -> _ErrorResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _FaultyRequest:
    """``session.request(...)`` as gcsfs uses it (``async with``): counted by the plan first;
    the injected fault is answered here, before anything is sent."""

    def __init__(
        self, session: Any, faults: GCSFaults, method: str, url: str, kwargs: dict[str, Any]
    ) -> None:
        self._session, self._faults = session, faults
        self._method, self._url, self._kwargs = method, url, kwargs
        self._real: Any = None
        self._injected = False

    async def __aenter__(self) -> Any:
        import aiohttp

        faults = self._faults
        op, name = faults.describe(self._method, self._url, self._kwargs)
        try:
            faults.plan.hit(op, name)
        except InjectedError:
            error = faults.plan.error
            spec = GCS_HTTP_ERRORS[error]
            what = f"{self._method} {name} {INJECTED_MARK}"
            if error == "timeout":  # aiohttp's read timeout (a TimeoutError and a ClientError)
                cls: type = type(
                    "InjectedServerTimeout", (aiohttp.ServerTimeoutError, InjectedError), {}
                )
                raise cls(f"timeout reading the answer to {what}") from None
            if error == "ECONNRESET":
                cls = type("InjectedClientOSError", (aiohttp.ClientOSError, InjectedError), {})
                raise cls(errno.ECONNRESET, f"{os.strerror(errno.ECONNRESET)}: {what}") from None
            assert spec is not None, error
            status, reason, message = spec
            body = _gcs_error_body(status, reason, f"{message} {INJECTED_MARK}")
            self._injected = True
            return _ErrorResponse(self._url, status, body)
        self._real = self._session.request(self._method, self._url, **self._kwargs)
        response = await self._real.__aenter__()
        if op == "initiate-upload":  # the session URI names the upload from now on
            upload = _query(response.headers.get("Location", "")).get("upload_id")
            if upload:
                faults.uploads[upload] = name
        return response

    async def __aexit__(self, *exc: Any) -> Any:
        if self._injected and isinstance(exc[1], BaseException):
            # What gcsfs raised reading the injected answer (inside this ``async with``).
            setattr(exc[1], _INJECTED_ATTR, True)
        if self._real is not None:
            return await self._real.__aexit__(*exc)
        return None


def _multipart_name(data: Any) -> str:
    """The object named by the metadata part of a multipart upload's body (gcsfs's
    ``simple_upload``: the JSON metadata, then the bytes)."""
    raw = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else b""
    try:
        return str(json.loads(raw.split(b"\n\n", 1)[1].split(b"\n", 1)[0])["name"])
    except (IndexError, ValueError, KeyError):
        return ""


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).items()}


class _FaultySession:
    """A gcsfs filesystem's aiohttp session, with its requests going through a plan."""

    def __init__(self, real: Any, faults: GCSFaults) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def request(self, method: str, url: Any, **kwargs: Any) -> _FaultyRequest:
        return _FaultyRequest(self._real, self._faults, method, str(url), kwargs)


class GCSFaults:
    """Counts the HTTP requests a gcsfs filesystem sends and answers the k-th, unsent, with a
    GCS error response (GCS_HTTP_ERRORS: gcsfs's ``validate_response`` translates it as it
    would GCS's), a read timeout or a reset connection. ``op`` names the JSON API call
    (list, stat, read, delete, put: a media upload, upload: a multipart upload,
    initiate-upload and upload-chunk: a resumable one, probe: the one-item listing of
    ``info()``, ...) and the path is the object's."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.uploads: dict[str, str] = {}  # resumable upload id -> object
        self._attached: list[tuple[Any, Any]] = []

    def describe(self, method: str, url: str, kwargs: dict[str, Any]) -> tuple[str, str]:
        """(operation, object) of a request of the JSON API."""
        parts = urllib.parse.urlsplit(url)
        params = {str(k): str(v) for k, v in (kwargs.get("params") or {}).items()}
        params.update(_query(url))
        path = urllib.parse.unquote(parts.path)
        upload = params.get("upload_id")
        if upload is not None:
            return ("cancel-upload" if method == "DELETE" else "upload-chunk"), self.uploads.get(
                upload, upload
            )
        head, _, rest = path.partition("/b/")
        bucket, _, obj = rest.partition("/o")
        obj = obj.removeprefix("/")
        if head.endswith("/upload/storage/v1"):
            kind = params.get("uploadType", "")
            if kind == "media":
                return "put", f"{bucket}/{params.get('name', '')}"
            if kind == "resumable":
                return "initiate-upload", f"{bucket}/{(kwargs.get('json') or {}).get('name', '')}"
            return "upload", f"{bucket}/{_multipart_name(kwargs.get('data'))}"
        if not rest:
            return f"{method} buckets", ""
        if "/o" not in rest:
            return f"{method} bucket", bucket
        if not obj:
            # gcsfs's info() sends a one-item listing beside the object's GET (its answer is
            # used only if the object is not there, or its GET was refused): a probe.
            op = "probe" if params.get("maxResults") == "1" else "list"
            return op, f"{bucket}/{params.get('prefix', '')}"
        if method == "GET":
            return ("read" if params.get("alt") == "media" else "stat"), f"{bucket}/{obj}"
        if method == "DELETE":
            return "delete", f"{bucket}/{obj}"
        return f"{method} object", f"{bucket}/{obj}"

    def attach(self, fs: Any, bucket: str) -> None:
        """Send the requests of gcsfs filesystem ``fs`` through the plan (attach to the
        instance anyckpt uses, ``manager.storage.fs``)."""
        if any(f is fs for f, _ in self._attached):
            return
        fs.ls(bucket, refresh=True)  # the session, which gcsfs keeps
        self._attached.append((fs, fs._session))
        fs._session = _FaultySession(fs._session, self)

    def detach(self) -> None:
        for fs, session in self._attached:
            fs._session = session
        self._attached.clear()
