"""Real object-store servers for the tests: S3 (moto in server mode) and GCS (gcp-storage-emulator).

Each server runs in a child process of its own (``python tests/servers.py s3|gcs``) bound to
127.0.0.1 on a port the kernel picks, so it serves requests in parallel with the test process
instead of competing for its GIL. The child prints ``READY <port>`` once listening and exits when
its stdin reaches end-of-file: when the fixture closes it at teardown, or when the test process
dies without tearing down. No orphan outlives the session either way.

Fixtures (registered in ``tests/conftest.py``):

* ``s3_server`` / ``gcs_server`` (session): the endpoint URL (``http://127.0.0.1:PORT``). They
  create no bucket, and for the whole session point the environment at the local server with
  dummy credentials (``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``...), so no client can reach
  real AWS or Google.
* ``s3_bucket`` / ``gcs_bucket`` (function): a fresh, empty bucket per test, as a
  :class:`RemoteBucket` ``(url, storage_options)``: ``anyckpt.save(bucket.url + "/ckpt/m-1",
  tensors, storage_options=bucket.storage_options)``. fsspec's filesystem instance caches are
  cleared before and after each test, and the bucket is emptied afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any, NamedTuple

import pytest

HOST = "127.0.0.1"
#: Upper bound for a server to start and accept connections.
STARTUP_TIMEOUT = 60.0
#: How long a server gets to exit after its stdin closes (then SIGTERM, then SIGKILL).
SHUTDOWN_TIMEOUT = 10.0
#: S3's smallest allowed part. s3fs's default block is 50 MiB; the S3 storage options set the
#: block to this so a tensor of a few MiB already goes through a multipart upload.
S3_BLOCK_SIZE = 5 * 2**20
#: Not us-east-1: s3fs names the client's region as the new bucket's LocationConstraint, which
#: S3 (and moto) refuse for us-east-1.
S3_REGION = "us-west-2"
GCS_PROJECT = "anyckpt-test"
_DUMMY_AWS = "anyckpt-testing"


# -- the child process ---------------------------------------------------------------------


def _serve(kind: str) -> None:
    """Run one server in this process until stdin reaches EOF (child side)."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("werkzeug", "gcp_storage_emulator", "moto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    stop: Callable[[], None]
    if kind == "s3":
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        moto.start()
        port = moto.get_host_and_port()[1]
        stop = moto.stop
    elif kind == "gcs":
        from gcp_storage_emulator.server import create_server

        _add_resumable_upload_cancel()
        _add_generation_preconditions()
        emulator = create_server(HOST, 0, in_memory=True)
        emulator.start()
        port = emulator._api._httpd.server_address[1]
        stop = emulator.stop
    else:
        raise SystemExit(f"unknown server kind {kind!r} (expected s3 or gcs)")
    print(f"READY {port}", flush=True)
    try:
        sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    finally:
        stop()


def _add_resumable_upload_cancel() -> None:
    """Teach the emulator to cancel a resumable upload, as GCS does.

    gcsfs discards an unfinished upload with ``DELETE`` on its session URI; GCS answers 499,
    the emulator 501 (not implemented), which gcsfs retries for about half a minute. This adds
    the missing route: drop the session and its bytes, answer 499.
    """
    from types import SimpleNamespace

    from gcp_storage_emulator import server, settings
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.storage import RESUMABLE_DIR

    def cancel(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
        upload_id = (request.query.get("upload_id") or [""])[0]
        try:
            storage.delete_resumable_file_obj(upload_id)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        with contextlib.suppress(Exception):
            storage._delete_file(RESUMABLE_DIR, storage.safe_id(upload_id))
        response.status = SimpleNamespace(value=499, phrase="Client Closed Request")

    routes = [h for r, h in server.HANDLERS if r.startswith(f"^{settings.UPLOAD_API_ENDPOINT}/")]
    if len(routes) != 1 or "PUT" not in routes[0]:
        raise RuntimeError("gcp-storage-emulator's upload route is not where it used to be")
    routes[0].setdefault("DELETE", cancel)


def _add_generation_preconditions() -> None:
    """Teach the emulator ``ifGenerationMatch`` on media uploads and deletes, as GCS does.

    anyckpt's directory lock and state file are written with it (``0``: only if absent; a
    generation: only if unchanged), and GCS answers 412 when it does not hold. The emulator
    ignores the parameter; this checks it (check and write under one lock) for uploads that
    name their object in the query (``uploadType=media``) and for deletes.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    guard = threading.Lock()

    def conditional(handler: Any, name_of: Callable[[Any], str | None]) -> Any:
        def wrapped(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
            wanted = (request.query.get("ifGenerationMatch") or [None])[0]
            name = name_of(request)
            if wanted is None or not name:
                return handler(request, response, storage, *args, **kwargs)
            with guard:
                try:
                    current = str(
                        storage.get_file_obj(request.params["bucket_name"], name)["generation"]
                    )
                except NotFound:
                    current = "0"
                if current != str(wanted):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                    return None
                return handler(request, response, storage, *args, **kwargs)

        return wrapped

    replacements = {
        objects.insert: conditional(objects.insert, lambda r: (r.query.get("name") or [None])[0]),
        objects.delete: conditional(objects.delete, lambda r: r.params.get("object_id")),
    }
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in replacements:
                handlers[method] = replacements[handler]
    objects.insert = replacements[objects.insert]


# -- the parent side -----------------------------------------------------------------------


class ServerProcess:
    """One server child process; :meth:`start` returns its endpoint URL."""

    def __init__(self, kind: str, log_path: Path) -> None:
        self.kind = kind
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self) -> str:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), self.kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_child_env(),
            )
        try:
            assert self.proc.stdout is not None
            port = self._read_port(self.proc.stdout, time.monotonic() + STARTUP_TIMEOUT)
            _wait_for_port(HOST, port, time.monotonic() + STARTUP_TIMEOUT, self._check_alive)
        except BaseException:
            self.stop()
            raise
        self.endpoint = f"http://{HOST}:{port}"
        return self.endpoint

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.kind} server exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def _read_port(self, stdout: IO[bytes], deadline: float) -> int:
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not line or not line[0].startswith(b"READY "):
            self._check_alive()
            raise RuntimeError(
                f"{self.kind} server did not report its port within {STARTUP_TIMEOUT}s "
                f"(got {line!r}):\n{self.log_tail()}"
            )
        return int(line[0].split()[1])

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Close stdin (the child stops its server and exits); SIGTERM, then SIGKILL, if not."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_aws_env(""))
    env.pop("AWS_ENDPOINT_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_for_port(host: str, port: int, deadline: float, check_alive: Callable[[], None]) -> None:
    """Return once ``host:port`` accepts a TCP connection; raise when ``deadline`` passes."""
    while True:
        check_alive()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing accepts connections on {host}:{port}") from exc
            time.sleep(0.05)


def _aws_env(endpoint: str) -> dict[str, str]:
    """Dummy credentials and no config files: boto never looks for real AWS settings."""
    env = {
        "AWS_ACCESS_KEY_ID": _DUMMY_AWS,
        "AWS_SECRET_ACCESS_KEY": _DUMMY_AWS,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def clear_fs_caches() -> None:
    """Forget every cached s3fs/gcsfs filesystem instance (and with it, its listings cache)."""
    import fsspec

    classes: list[Any] = []
    with contextlib.suppress(ImportError):
        import s3fs

        classes.append(s3fs.S3FileSystem)
    with contextlib.suppress(ImportError):
        import gcsfs.core

        classes.append(gcsfs.core.GCSFileSystem)
        classes.extend(fsspec.get_filesystem_class(p) for p in ("gs", "gcs"))
    for cls in {id(c): c for c in classes}.values():
        cls.clear_instance_cache()


class RemoteBucket(NamedTuple):
    """A bucket on a local test server: its URL and the fsspec options to reach it."""

    url: str  # "s3://name" or "gs://name", no trailing slash
    storage_options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[1]

    def filesystem(self) -> Any:
        """A filesystem instance of its own (not fsspec's cached one that anyckpt gets), with
        no listings cache: for looking at, or changing, the store behind anyckpt's back."""
        import fsspec

        protocol = self.url.split("://", 1)[0]
        return fsspec.filesystem(
            protocol, skip_instance_cache=True, use_listings_cache=False, **self.storage_options
        )


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": _DUMMY_AWS,
        "secret": _DUMMY_AWS,
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": S3_REGION},
        "default_block_size": S3_BLOCK_SIZE,
    }


def gcs_storage_options(endpoint: str) -> dict[str, Any]:
    return {"token": "anon", "project": GCS_PROJECT, "endpoint_url": endpoint}


def _fresh_bucket_name() -> str:
    return f"anyckpt-{uuid.uuid4().hex[:20]}"


@contextlib.contextmanager
def _bucket(protocol: str, storage_options: dict[str, Any]) -> Iterator[RemoteBucket]:
    bucket = RemoteBucket(f"{protocol}://{_fresh_bucket_name()}", storage_options)
    admin = bucket.filesystem()
    admin.mkdir(bucket.name)
    clear_fs_caches()
    try:
        yield bucket
    finally:
        clear_fs_caches()
        # Free the server's memory; the bucket itself is never reused.
        with contextlib.suppress(Exception):
            objects = admin.find(bucket.name)
            if objects:
                admin.rm(objects)


# -- fixtures (imported into tests/conftest.py) --------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1 (one per session; creates nothing)."""
    server = ServerProcess("s3", tmp_path_factory.mktemp("s3-server") / "moto.log")
    endpoint = server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
                mp.delenv(var, raising=False)
            for var, value in _aws_env(endpoint).items():
                mp.setenv(var, value)
            yield endpoint
    finally:
        clear_fs_caches()
        server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a gcp-storage-emulator on 127.0.0.1 (one per session; creates nothing).

    ``gs://`` and ``gcs://`` are served by gcsfs's plain ``GCSFileSystem`` for the session: the
    default ``ExtendedGcsFileSystem`` probes each bucket's layout over gRPC (Storage Control
    API), which the emulator (JSON API only) does not speak.
    """
    import fsspec
    import gcsfs.core

    server = ServerProcess("gcs", tmp_path_factory.mktemp("gcs-server") / "emulator.log")
    endpoint = server.start()
    previous = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", endpoint)
            mp.setenv("GCSFS_DEFAULT_PROJECT", GCS_PROJECT)
            mp.setenv("NO_GCE_CHECK", "true")
            clear_fs_caches()
            for protocol in previous:
                fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
            yield endpoint
    finally:
        clear_fs_caches()
        for protocol, cls in previous.items():
            fsspec.register_implementation(protocol, cls, clobber=True)
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[RemoteBucket]:
    """A fresh S3 bucket for one test: ``(url, storage_options)``."""
    with _bucket("s3", s3_storage_options(s3_server)) as bucket:
        yield bucket


@pytest.fixture
def gcs_bucket(gcs_server: str) -> Iterator[RemoteBucket]:
    """A fresh GCS bucket for one test: ``(url, storage_options)``."""
    with _bucket("gs", gcs_storage_options(gcs_server)) as bucket:
        yield bucket


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "")
