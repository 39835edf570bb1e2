"""A remote store that cannot be used at all — no credentials, nothing listening at the endpoint —
is reported as anyckpt's own error (exit status 5 on the command line) with a one-line cause and
a hint, at once: connections that cannot be made are not retried.

Every endpoint here is on 127.0.0.1: a closed port (bound, then released, so the kernel refuses
connections to it) or a moto server; nothing is sent anywhere else. The environment of every
client has no AWS credentials, no AWS config files and no instance-metadata lookup.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from servers import S3_REGION, clear_fs_caches

import anyckpt
from anyckpt.errors import CheckpointError, RemoteUnavailableError, StorageAccessError
from anyckpt.storage import RetryPolicy, Storage, is_transient, is_unreachable, remote_error

ANYCKPT = str(Path(sys.executable).parent / "anyckpt")
TIMEOUT = 120

#: Environment variables that could give botocore credentials, or send it off this machine.
_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def _no_credentials_env(tmp_path: Path) -> dict[str, str]:
    """No AWS credentials anywhere botocore looks, and no instance-metadata lookup."""
    return {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": S3_REGION,
        "NO_GCE_CHECK": "true",
    }


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This process's environment without AWS credentials (also over the s3_server fixture's
    dummy ones); the environment for a child process is returned."""
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    env = _no_credentials_env(tmp_path)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    clear_fs_caches()
    yield env
    clear_fs_caches()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AWS_VARS}
    env.pop("STORAGE_EMULATOR_HOST", None)
    env.update(extra)
    env["COLUMNS"] = "120"
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ANYCKPT, *args], capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("anyckpt: error: "), lines[0]
    return lines[0]


# -- the command line ----------------------------------------------------------------------


def test_cli_s3_without_credentials_is_an_access_error(
    s3_server: str, no_credentials: dict[str, str]
) -> None:
    result = _run(
        ["ls", "s3://bucket/x", "-o", f"endpoint_url={s3_server}"], _child_env(no_credentials)
    )
    line = _one_line(result)
    assert result.returncode == 5, result.stderr
    assert "s3://bucket/x" in line
    assert "credentials" in line.lower()
    assert "-o anon=true" in line
    assert "internal error" not in line


def test_cli_s3_unreachable_endpoint(closed_port: int, no_credentials: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    result = _run(
        ["ls", "s3://bucket/x", "-o", f"endpoint_url={endpoint}", "-o", "key=k", "-o", "secret=s"],
        _child_env(no_credentials),
    )
    line = _one_line(result)
    assert result.returncode == 5, result.stderr
    assert f"cannot connect to the endpoint {endpoint}" in line
    assert "endpoint_url" in line


@pytest.mark.parametrize("command", ["ls", "inspect", "verify"])
def test_cli_gcs_unreachable_endpoint(
    closed_port: int, no_credentials: dict[str, str], command: str
) -> None:
    """gcsfs's default filesystem for gs:// (which first asks the bucket's layout over gRPC),
    anonymous, with the endpoint on a closed port."""
    endpoint = f"http://127.0.0.1:{closed_port}"
    result = _run(
        [command, "gs://bucket/x", "-o", "token=anon", "-o", f"endpoint_url={endpoint}"],
        _child_env(no_credentials),
    )
    line = _one_line(result)
    assert result.returncode == 5, result.stderr
    assert "gs://bucket/x" in line
    assert f"cannot connect to the endpoint {endpoint}" in line


# -- the API: the same errors, and how many connections were tried --------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class _Attempts:
    """Counts botocore's HTTP request attempts (``before-send`` events), retries included."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, **_: Any) -> None:
        self.count += 1


def _count_s3_attempts(storage: Storage) -> _Attempts:
    attempts = _Attempts()
    for emitter in (storage.fs.session, storage.fs.s3.meta.events):
        emitter.register("before-send.s3", attempts)
    return attempts


def _s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "client_kwargs": {"region_name": S3_REGION}, **extra}


@pytest.mark.anyio
async def test_api_s3_unreachable_fails_at_first_attempt(
    closed_port: int, no_credentials: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    options = _s3_options(endpoint, key="k", secret="s")
    storage, _ = Storage.from_url("s3://bucket/x", options)  # the instance anyckpt gets
    attempts = _count_s3_attempts(storage)
    caplog.set_level(logging.WARNING, logger="anyckpt.storage")
    with pytest.raises(RemoteUnavailableError) as info:
        await anyckpt.load("s3://bucket/x/ckpt-1", storage_options=options)
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot connect to the endpoint {endpoint}" in message
    assert "s3://bucket/x/ckpt-1" in message
    # One request per operation tried, no retry (botocore's or anyckpt's).
    assert 1 <= attempts.count <= 2, attempts.count
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


@pytest.mark.anyio
async def test_api_s3_save_to_unreachable_endpoint(
    closed_port: int, no_credentials: dict[str, str]
) -> None:
    options = _s3_options(f"http://127.0.0.1:{closed_port}", key="k", secret="s")
    storage, _ = Storage.from_url("s3://bucket/x", options)
    attempts = _count_s3_attempts(storage)
    with pytest.raises(RemoteUnavailableError) as info:
        await anyckpt.save("s3://bucket/x/ckpt-1", {"w": np.ones(3)}, storage_options=options)
    assert 1 <= attempts.count <= 4, attempts.count  # the files go concurrently
    # The client's error stays its cause, through the concurrent writes of the files (they
    # re-raise the first error as itself: it once lost its cause there).
    assert info.value.__cause__ is not None
    assert type(info.value.__cause__).__name__ == "EndpointConnectionError", info.value.__cause__


@pytest.mark.anyio
async def test_api_s3_without_credentials(s3_server: str, no_credentials: dict[str, str]) -> None:
    options = _s3_options(s3_server)
    with pytest.raises(StorageAccessError) as info:
        await anyckpt.load("s3://bucket/x/ckpt-1", storage_options=options)
    assert not isinstance(info.value, RemoteUnavailableError)
    assert "credentials" in str(info.value).lower()
    assert "anon=true" in info.value.hint


@pytest.mark.anyio
async def test_api_gcs_unreachable_fails_without_retries(
    closed_port: int, no_credentials: dict[str, str]
) -> None:
    """gcsfs, anonymous, endpoint on a closed port: every connection aiohttp tries is counted
    (a trace of the session); the first failure ends the operation."""
    import fsspec
    import gcsfs.core

    previous = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    for protocol in previous:  # plain gcsfs: no gRPC layout probe, only HTTP
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    try:
        await _load_gcs_counting_connections(closed_port)
    finally:
        for protocol, cls in previous.items():
            fsspec.register_implementation(protocol, cls, clobber=True)


async def _load_gcs_counting_connections(closed_port: int) -> None:
    import aiohttp

    connections = 0

    async def on_connect(*_: Any) -> None:
        nonlocal connections
        connections += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(on_connect)
    endpoint = f"http://127.0.0.1:{closed_port}"
    options = {
        "token": "anon",
        "endpoint_url": endpoint,
        "session_kwargs": {"trace_configs": [trace]},
    }
    with pytest.raises(RemoteUnavailableError) as info:
        await anyckpt.load("gs://bucket/x/ckpt-1", storage_options=options)
    assert f"cannot connect to the endpoint {endpoint}" in str(info.value)
    assert "\n" not in str(info.value)
    assert 1 <= connections <= 2, connections


def test_sync_api_raises_the_same(closed_port: int, no_credentials: dict[str, str]) -> None:
    options = _s3_options(f"http://127.0.0.1:{closed_port}", key="k", secret="s")
    with pytest.raises(RemoteUnavailableError):
        anyckpt.sync.load("s3://bucket/x/ckpt-1", storage_options=options)


# -- the classification ----------------------------------------------------------------------


def _refused(port: int) -> OSError:
    with socket.socket() as sock:
        try:
            sock.connect(("127.0.0.1", port))
        except OSError as exc:
            return exc
    raise AssertionError("the closed port accepted a connection")


def test_a_refused_connection_is_unreachable_not_transient(closed_port: int) -> None:
    refused = _refused(closed_port)
    assert refused.errno == errno.ECONNREFUSED
    assert is_unreachable(refused)
    assert not is_transient(refused)
    wrapped = RuntimeError("request failed")  # as a client library raises it
    wrapped.__cause__ = refused
    assert is_unreachable(wrapped)
    assert not is_transient(wrapped)


def test_botocore_errors_are_classified() -> None:
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    url = "http://127.0.0.1:1"
    assert is_unreachable(EndpointConnectionError(endpoint_url=url))
    assert not is_transient(EndpointConnectionError(endpoint_url=url))
    assert is_transient(ConnectTimeoutError(endpoint_url=url))  # slow, not refused
    assert is_transient(ReadTimeoutError(endpoint_url=url))
    assert not is_unreachable(ReadTimeoutError(endpoint_url=url))
    error = remote_error(NoCredentialsError(), "listing s3://b/x")
    assert isinstance(error, StorageAccessError)
    assert str(error).startswith("listing s3://b/x: Unable to locate credentials (")
    assert remote_error(ReadTimeoutError(endpoint_url=url), "reading s3://b/x") is None


def test_transient_errors_stay_transient() -> None:
    for code in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
        exc = OSError(code, os.strerror(code))
        assert is_transient(exc), code
        assert not is_unreachable(exc), code
    assert is_transient(TimeoutError())
    assert not is_transient(CheckpointError("x"))
    assert remote_error(OSError(errno.ECONNRESET, "reset"), "reading s3://b/x") is None


def test_dns_failure_is_unreachable() -> None:
    exc = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert is_unreachable(exc)
    assert not is_transient(exc)


class _ResettingServer:
    """A listener on 127.0.0.1 that accepts each connection, reads the request and resets the
    connection (SO_LINGER 0: an RST, not a FIN): a connection made, then dropped."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.sock.settimeout(0.05)  # to notice close()
        self.accepted = 0
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5.0)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self._closed = True
        self._thread.join(5.0)
        self.sock.close()


@pytest.fixture
def resetting_server() -> Iterator[_ResettingServer]:
    server = _ResettingServer()
    yield server
    server.close()


def test_a_reset_connection_under_aiohttp_is_transient_not_unreachable(
    resetting_server: _ResettingServer,
) -> None:
    """What aiohttp (under gcsfs) raises for a connection the server resets: transient, not a
    store that cannot be reached (that is a refused connection), and no anyckpt error."""
    import asyncio

    import aiohttp

    async def get() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{resetting_server.port}/x") as response,
        ):
            await response.read()

    with pytest.raises(aiohttp.ClientError) as info:
        asyncio.run(get())
    exc = info.value
    assert isinstance(exc, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)), repr(exc)
    assert is_transient(exc), repr(exc)
    assert not is_unreachable(exc), repr(exc)
    assert remote_error(exc, "reading gs://b/x") is None


def test_gcs_reads_over_reset_connections_are_retried_then_fail_as_themselves(
    resetting_server: _ResettingServer, no_credentials: dict[str, str]
) -> None:
    """gcsfs (one try per request) against an endpoint that resets every connection: anyckpt
    tries the read as many times as its policy says (each a new connection), then raises the
    client's error, not RemoteUnavailableError (the store was reached)."""
    import fsspec
    import gcsfs.core

    previous = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    for protocol in previous:  # plain gcsfs: no gRPC layout probe, only HTTP
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    original_retries = gcsfs.core.GCSFileSystem.retries
    gcsfs.core.GCSFileSystem.retries = 1
    try:
        options = {"token": "anon", "endpoint_url": f"http://127.0.0.1:{resetting_server.port}"}
        storage, root = Storage.from_url("gs://bucket/x", options)
        storage.retry = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.004)
        with pytest.raises(OSError, match="reset") as info:
            storage.read_bytes(f"{root}/checkpoint")
        assert not isinstance(info.value, CheckpointError), repr(info.value)
        assert is_transient(info.value), repr(info.value)
        # At least one connection per try (gcsfs may open a second for the same request).
        assert resetting_server.accepted >= 3, resetting_server.accepted
        print(f"reset connections: {resetting_server.accepted}, raised {info.value!r}")
    finally:
        gcsfs.core.GCSFileSystem.retries = original_retries
        clear_fs_caches()
        for protocol, cls in previous.items():
            fsspec.register_implementation(protocol, cls, clobber=True)
