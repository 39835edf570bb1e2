"""Faults after the effect (issue 14): the operation took effect, then failed.

The fault suites of ``test_fault_injection.py`` fail an operation *before* it happens. Here it
happens first:

* local disk: ``write``/``writev``/``pwrite``, ``fsync`` of a file or of the directory,
  ``rename``, ``unlink``, ``ftruncate`` and file creation are performed by the real ``os``,
  then raise EIO (the proxy of :mod:`power_loss`, installed on every anyckpt module doing file
  I/O);
* S3 (moto server) and GCS (the emulator): the k-th HTTP request reaches the server and is
  applied; then its answer is lost: a read timeout, a connection reset, or replaced by an
  error status (429, 500, 502, 503, 504). On S3 a botocore ``before-parse`` hook does it
  (the response arrived; it is dropped and the error raised as botocore raises it); on GCS
  gcsfs's own ``validate_response`` is wrapped (gcsfs read the answer; the error is raised
  where gcsfs raises it, inside its retry loop, which then retries as it would).

Every k up to the number of operations of a clean save, one fault each. Each time: the save
either commits (its ``await`` returns and the new checkpoint is the latest) or fails with the
injected error; the previous checkpoint is never damaged; what the store then holds restores;
the next save works, and a new manager finds the directory clean. A conditional write applied
but unanswered is never reported as a conflict (S3 and GCS alike).
"""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from power_loss import Op, Recording
from reliability_common import assert_clean, assert_values, basename, record_figures, values
from reliability_faults import INJECTED_MARK, InjectedError, is_injected

import anyckpt
import anyckpt.storage
from anyckpt import CheckpointManager, ConcurrentWriterError
from anyckpt.storage import RetryPolicy, Storage, is_transient

pytestmark = pytest.mark.anyio

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.004)
KEEP = 2
SHARDS = 2
OPTIONS: dict[str, Any] = {
    "max_to_keep": KEEP,
    "format_options": {"num_shards": SHARDS},
    "lease_seconds": 3600.0,  # no renewal during a test: its requests would be counted
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- is_transient: throttling and server errors as each client raises them -----------------


def _s3(status: int, code: str) -> BaseException:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )
    return translate_boto_error(error)  # what s3fs raises


def _gcs(status: int) -> BaseException:
    """What gcsfs raises for an answer of ``status`` (its own translation)."""
    from gcsfs.retry import validate_response

    body = b'{"error": {"code": %d, "message": "injected"}}' % status
    try:
        validate_response(status, body, "b/bucket/o/key")
    except Exception as exc:
        return exc
    raise AssertionError(f"gcsfs accepted status {status}")


def _gcs_text(status: int) -> BaseException:
    """What gcsfs raises for an answer of ``status`` whose body is not GCS's JSON (a proxy's or
    load balancer's page): its ``HttpError`` with the status as code (502: ``ProxyError``)."""
    from gcsfs.retry import validate_response

    try:
        validate_response(status, b"<html>Service Unavailable</html>", "b/bucket/o/key")
    except Exception as exc:
        return exc
    raise AssertionError(f"gcsfs accepted status {status}")


def _gcs_http_error(code: int | str) -> BaseException:
    """gcsfs's ``HttpError`` as its retry logic knows it: the code an int or, as gcsfs also
    retries (``gcsfs.retry.errs``), its decimal string."""
    from gcsfs.retry import HttpError

    return HttpError({"code": code, "message": "injected"})


def _aiohttp(name: str) -> BaseException:
    import aiohttp

    return getattr(aiohttp, name)()


TRANSIENT: dict[str, Callable[[], BaseException]] = {
    **{f"s3-{s}-{c}": (lambda s=s, c=c: _s3(s, c)) for s, c in [
        (429, "TooManyRequests"), (500, "InternalError"), (502, "BadGateway"),
        (503, "SlowDown"), (504, "GatewayTimeout"), (503, "ServiceUnavailable")]},
    **{f"gcs-{s}": (lambda s=s: _gcs(s)) for s in (408, 429, 500, 502, 503, 504)},
    **{f"gcs-text-{s}": (lambda s=s: _gcs_text(s)) for s in (429, 500, 502, 503, 504)},
    **{f"gcs-HttpError-{c!r}": (lambda c=c: _gcs_http_error(c)) for c in (
        429, 500, 502, 503, 504, "429", "500", "502", "503", "504")},
    # A reset connection as aiohttp (under gcsfs) raises it: an OSError with ECONNRESET, or
    # (aiohttp 3.10 and later) its own ConnectionResetError while writing the request.
    "aiohttp-ClientOSError-ECONNRESET": lambda: __import__("aiohttp").ClientOSError(
        errno.ECONNRESET, "Connection reset by peer"
    ),
    "aiohttp-ClientConnectionResetError": lambda: __import__(
        "aiohttp"
    ).ClientConnectionResetError("Cannot write to closing transport"),
    "aiohttp-ServerDisconnectedError": lambda: _aiohttp("ServerDisconnectedError"),
    "aiohttp-ClientPayloadError": lambda: _aiohttp("ClientPayloadError"),
    "aiohttp-ServerTimeoutError": lambda: _aiohttp("ServerTimeoutError"),
    "botocore-ConnectionClosedError": lambda: __import__(
        "botocore.exceptions", fromlist=["x"]
    ).ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
    "asyncio-TimeoutError": asyncio.TimeoutError,
    "ECONNRESET": lambda: ConnectionResetError(errno.ECONNRESET, "reset"),
}  # fmt: skip
PERMANENT: dict[str, Callable[[], BaseException]] = {
    "s3-403-AccessDenied": lambda: _s3(403, "AccessDenied"),
    "s3-404-NoSuchKey": lambda: _s3(404, "NoSuchKey"),
    "s3-400-InvalidRequest": lambda: _s3(400, "InvalidRequest"),
    **{f"gcs-{s}": (lambda s=s: _gcs(s)) for s in (400, 401, 403, 404, 412)},
    **{
        f"gcs-HttpError-{c!r}": (lambda c=c: _gcs_http_error(c))
        for c in (400, 401, 403, 409, 412, "403", "412", None)
    },
    "EIO": lambda: OSError(errno.EIO, "I/O error"),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_throttling_server_errors_and_lost_connections_are_transient(name: str) -> None:
    exc = TRANSIENT[name]()
    assert is_transient(exc), (name, type(exc).__mro__, exc)
    if name not in ("ECONNRESET", "asyncio-TimeoutError"):  # (built-ins: only themselves)
        wrapped = RuntimeError("request failed")  # under a library's own error
        wrapped.__cause__ = exc
        assert is_transient(wrapped), name


@pytest.mark.parametrize("name", sorted(PERMANENT))
def test_client_errors_stay_permanent(name: str) -> None:
    exc = PERMANENT[name]()
    assert not is_transient(exc), (name, type(exc).__mro__, exc)


# -- local disk: the operation done, then EIO ----------------------------------------------

#: Operations that change the disk (the proxy records them), failed after they took effect.
LOCAL_KINDS = frozenset(
    {"create", "write", "truncate", "fsync", "dirsync", "rename", "link", "unlink"}
)


class _Injected(OSError, InjectedError):
    pass


@dataclass
class AfterPlan:
    """Counts the operations while armed; the ``at``-th raises once it took effect."""

    armed: bool = False
    count: int = 0
    at: int | None = None
    fired: Op | None = None
    log: list[str] = field(default_factory=list)

    def arm(self, at: int | None) -> None:
        self.armed, self.count, self.at, self.fired, self.log = True, 0, at, None, []

    def disarm(self) -> None:
        self.armed = False

    def __call__(self, op: Op) -> None:
        if not self.armed or op.kind not in LOCAL_KINDS:
            return
        self.count += 1
        self.log.append(repr(op))
        if self.count == self.at:
            self.fired = op
            raise _Injected(errno.EIO, f"{os.strerror(errno.EIO)} after {op.kind} {INJECTED_MARK}")


async def _check(url: str, options: Any, floor: int) -> int:
    """An independent reader: the latest is at least ``floor`` and restores, and so does each
    checkpoint retention keeps. Returns the latest step."""
    state = await anyckpt.get_checkpoint_state(url, storage_options=options)
    assert state is not None
    latest = int(state.model_checkpoint_path.rsplit("-", 1)[1])
    assert latest >= floor
    for prefix in list(state.all_model_checkpoint_paths)[-KEEP:]:
        step = int(prefix.rsplit("-", 1)[1])
        assert_values(await anyckpt.load(prefix, storage_options=options), step)
    return latest


async def test_local_operations_that_fail_after_taking_effect(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    plan = AfterPlan()
    outcomes: Counter[str] = Counter()
    with Recording(tmp_path) as proxy:
        proxy.after = plan
        async with CheckpointManager(str(directory), **OPTIONS) as manager:
            for step in (1, 2):
                await (await manager.save(values(step), step=step))
            step = 3
            plan.arm(None)
            await (await manager.save(values(step), step=step))
            total = plan.count
            plan.disarm()
            assert total >= 15, plan.log
        for k in range(1, total + 1):
            # A manager per trial: after a failure the one that saw it may refuse to go on
            # (see below); a new one must always work.
            async with CheckpointManager(str(directory), **OPTIONS) as manager:
                before = manager.latest_step
                assert before is not None
                step += 1
                plan.arm(k)
                outcome: BaseException | None = None
                try:
                    await (await manager.save(values(step), step=step))
                except Exception as exc:
                    outcome = exc
                fired = plan.fired
                plan.disarm()
                assert fired is not None, (k, plan.log)
                if outcome is not None:
                    assert is_injected(outcome), (k, fired, outcome)
                latest = await _check(str(directory), None, before)
                assert latest in (before, step), (k, fired)
                if outcome is None:
                    assert latest == step, (k, fired)
                kind = f"{fired.kind}:{'committed' if latest == step else 'failed'}"
                kind += ":reported" if outcome is not None else ":absorbed"
                outcomes[kind] += 1
                # The same manager saves again, even after the fault hit the state file's
                # rename after it took effect: the file then holds exactly the bytes the
                # manager wrote, so it adopts that version instead of taking it for another
                # writer's change (no ConcurrentWriterError).
                step += 1
                await (await manager.save(values(step), step=step))
                assert_values(await manager.restore(), step)
            # A new manager: the latest restores, nothing else is left, and it saves.
            async with CheckpointManager(str(directory), **OPTIONS) as manager:
                latest = manager.latest_step
                assert latest is not None
                assert latest >= before
                assert_values(await manager.restore(), latest)
                tracked = [basename(p) for p in manager.checkpoints]
                assert_clean(set(os.listdir(directory)), tracked, num_shards=SHARDS, lock=True)
                step += 1
                await (await manager.save(values(step), step=step))
    print(f"faults after the effect, local: {total} trials, {dict(outcomes)}")
    record_figures("faults-after", {"backend": "local", "trials": total, **outcomes})


# -- S3 and GCS: the request applied, its answer lost --------------------------------------

#: The answer each remote trial gets instead of the real one (rotated over the trials).
ANSWERS = ["timeout", "reset", "503", "500", "429", "502", "504"]


def _s3_error(kind: str, operation: str) -> BaseException:
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    url = f"(answer to {operation} lost {INJECTED_MARK})"
    if kind == "timeout":
        cls: type = type("InjectedReadTimeout", (ReadTimeoutError, InjectedError), {})
        return cls(endpoint_url=url)  # type: ignore[no-any-return]
    if kind == "reset":
        cls = type("InjectedConnectionClosed", (ConnectionClosedError, InjectedError), {})
        return cls(endpoint_url=url)  # type: ignore[no-any-return]
    code = {"503": "SlowDown", "500": "InternalError", "429": "TooManyRequests",
            "502": "BadGateway", "504": "GatewayTimeout"}[kind]  # fmt: skip
    return ClientError(
        {"Error": {"Code": code, "Message": f"{code} {INJECTED_MARK}"},
         "ResponseMetadata": {"HTTPStatusCode": int(kind)}},
        operation,
    )  # fmt: skip


@dataclass
class RemotePlan:
    """Counts requests while armed; the ``at``-th gets ``answer`` after the server applied it."""

    armed: bool = False
    count: int = 0
    at: int | None = None
    answer: str = "timeout"
    fired: str | None = None
    log: list[str] = field(default_factory=list)

    def arm(self, at: int | None, answer: str = "timeout") -> None:
        self.armed, self.count, self.at, self.answer = True, 0, at, answer
        self.fired, self.log = None, []

    def disarm(self) -> None:
        self.armed = False

    def hit(self, what: str) -> bool:
        if not self.armed:
            return False
        self.count += 1
        self.log.append(what)
        if self.count == self.at:
            self.fired = what
            return True
        return False


class S3After:
    """A botocore ``before-parse`` hook: the response arrived (the request was applied); the
    k-th is replaced by the plan's error, raised as botocore raises it."""

    def __init__(self, plan: RemotePlan) -> None:
        self.plan = plan
        self.clients: list[Any] = []

    def handler(self, operation_model: Any, **kwargs: Any) -> None:
        if self.plan.hit(operation_model.name):
            raise _s3_error(self.plan.answer, operation_model.name)

    def attach(self, fs: Any, bucket: str) -> None:
        if any(c is fs.s3 for c in self.clients if fs.s3 is not None):
            return
        fs.ls(bucket, refresh=True)  # a client, kept by s3fs
        fs.s3.meta.events.register("before-parse.s3", self.handler, unique_id="after-faults")
        self.clients.append(fs.s3)

    def detach(self) -> None:
        for client in self.clients:
            client.meta.events.unregister("before-parse.s3", unique_id="after-faults")
        self.clients.clear()


def _gcs_error(kind: str, what: str) -> BaseException:
    import aiohttp

    if kind == "timeout":
        return type("InjectedTimeout", (asyncio.TimeoutError, InjectedError), {})(what)
    if kind == "reset":
        cls = type("InjectedDisconnect", (aiohttp.ServerDisconnectedError, InjectedError), {})
        return cls(f"answer to {what} lost {INJECTED_MARK}")  # type: ignore[no-any-return]
    error = _gcs(int(kind))
    marked = type(f"Injected{type(error).__name__}", (type(error), InjectedError), {})
    new = marked.__new__(marked)
    new.__dict__.update(error.__dict__)
    new.args = error.args
    return new


class GCSAfter:
    """gcsfs's ``validate_response`` (called inside its request, once the answer was read),
    wrapped: the k-th answer becomes the plan's error, raised where gcsfs raises its own, so
    gcsfs's retry loop sees it as it would a real one (its backoff shortened)."""

    def __init__(self, plan: RemotePlan, monkeypatch: pytest.MonkeyPatch) -> None:
        import gcsfs.core
        import gcsfs.retry

        real = gcsfs.core.validate_response

        def validate(status: int, content: Any, path: str, args: Any = None) -> None:
            real(status, content, path, args)
            what = path.format(*args) if args else path
            if plan.hit(what):
                raise _gcs_error(plan.answer, what)

        async def quick_sleep(seconds: float) -> None:
            await asyncio.sleep(min(seconds, 0.002))

        monkeypatch.setattr(gcsfs.core, "validate_response", validate)
        monkeypatch.setattr(gcsfs.retry, "asyncio", _Namespace(sleep=quick_sleep))


class _Namespace:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@dataclass
class RemoteRig:
    kind: str
    url: str
    options: dict[str, Any]
    plan: RemotePlan
    attach: Callable[[CheckpointManager], None]

    def manager(self) -> CheckpointManager:
        manager = CheckpointManager(self.url, storage_options=self.options, **OPTIONS)
        manager.storage.retry = FAST_RETRY
        self.attach(manager)
        return manager

    def names(self) -> set[str]:
        armed, self.plan.armed = self.plan.armed, False
        storage, root = Storage.from_url(self.url, self.options)
        try:
            return set(storage.listdir(root))
        finally:
            self.plan.armed = armed


@pytest.fixture(params=["s3", "gcs"])
def remote(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[RemoteRig]:
    monkeypatch.setattr(anyckpt.storage, "DEFAULT_RETRY", FAST_RETRY)
    plan = RemotePlan()
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        # One try per request inside botocore and s3fs: what is retried is anyckpt's doing.
        options = {
            **bucket.storage_options,
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
        monkeypatch.setattr(fsspec.get_filesystem_class("s3"), "retries", 1)
        hook = S3After(plan)
        yield RemoteRig("s3", f"{bucket.url}/ckpt", options, plan,
                        lambda m: hook.attach(m.storage.fs, bucket.name))  # fmt: skip
        plan.disarm()
        hook.detach()
    else:
        bucket = request.getfixturevalue("gcs_bucket")
        GCSAfter(plan, monkeypatch)
        yield RemoteRig("gcs", f"{bucket.url}/ckpt-{uuid.uuid4().hex[:6]}",
                        dict(bucket.storage_options), plan, lambda m: None)  # fmt: skip
        plan.disarm()


async def test_remote_requests_applied_but_unanswered(remote: RemoteRig) -> None:
    """Every request of a save, in turn, is applied by the server and then answered with a
    timeout, a reset connection or an error status (rotating). The save commits or fails with
    that error, never with a false conflict; the previous checkpoint stays intact; the next
    save works. On S3 every such error is transient and every request anyckpt makes is
    retried as a whole (data uploads included), so every save must succeed."""
    outcomes: Counter[str] = Counter()
    fired_kinds: Counter[str] = Counter()
    async with remote.manager() as manager:
        for step in (1, 2):
            await (await manager.save(values(step), step=step))
        step = 3
        remote.plan.arm(None)
        await (await manager.save(values(step), step=step))
        total = remote.plan.count
        remote.plan.disarm()
        assert total >= 5, remote.plan.log
        for k in range(1, total + 1):
            before = manager.latest_step
            assert before is not None
            step += 1
            answer = ANSWERS[k % len(ANSWERS)]
            remote.plan.arm(k, answer)
            outcome: BaseException | None = None
            try:
                await (await manager.save(values(step), step=step))
            except Exception as exc:
                outcome = exc
            fired = remote.plan.fired
            remote.plan.disarm()
            fired_kinds[str(fired).split("?")[0]] += 1
            assert not isinstance(outcome, ConcurrentWriterError), (k, fired, outcome)
            if outcome is not None:
                assert remote.kind != "s3", (k, fired, answer, outcome)  # S3: all retried
                # GCS: the injected error; or, when the lost answer was that of a resumable
                # upload's last request, what gcsfs's retry of it got: the emulator drops a
                # finished upload session and answers 404 (GCS answers with the object).
                followup = isinstance(outcome, FileNotFoundError) and "upload_id=" in str(outcome)
                assert is_injected(outcome) or followup, (k, fired, outcome)
                outcomes["gcs: retried upload session gone"] += followup
            latest = await _check(remote.url, remote.options, before)
            assert latest in (before, step), (k, fired)
            assert (outcome is None) == (latest == step), (k, fired, outcome)
            outcomes[f"{answer}:{'committed' if outcome is None else 'failed'}"] += 1
            step += 1
            await (await manager.save(values(step), step=step))
            assert_values(await manager.restore(), step)
            tracked = [basename(p) for p in manager.checkpoints]
            assert_clean(remote.names(), tracked, num_shards=SHARDS, lock=True)
    if remote.kind == "s3":  # retention's deletes were among them (applied, then failed)
        assert fired_kinds["DeleteObject"] >= 2, fired_kinds
    async with remote.manager() as manager:
        assert manager.latest_step == step
        assert_values(await manager.restore(), step)
    print(f"faults after the effect, {remote.kind}: {total} trials, {dict(outcomes)}")
    record_figures("faults-after", {"backend": remote.kind, "trials": total, **outcomes})


@pytest.mark.parametrize("answer", ["timeout", "reset", "503"])
async def test_conditional_writes_applied_but_unanswered_are_not_conflicts(
    remote: RemoteRig, answer: str
) -> None:
    """The same contract on S3 (``If-None-Match``/``If-Match``) and GCS
    (``ifGenerationMatch``, which the test server adds to the emulator): a conditional create
    or replace that the server applied but whose answer was lost, then retried (by anyckpt,
    or by the client library), finds its own write and is no conflict; a real conflict stays
    one."""
    storage, root = Storage.from_url(remote.url, remote.options)
    storage.retry = FAST_RETRY
    path = f"{root}/lock"
    if remote.kind == "s3":
        S3After(remote.plan).attach(storage.fs, remote.url.split("://", 1)[1].split("/")[0])
    for op in ("create", "replace"):
        remote.plan.arm(1, answer)
        if op == "create":
            version = storage.create_exclusive(path, b"mine")
            expected = b"mine"
        else:
            version = storage.replace_if(path, b"mine, renewed", version)
            expected = b"mine, renewed"
        assert remote.plan.fired is not None, (op, remote.plan.log)  # the answer was lost
        assert remote.plan.count >= 2, (op, remote.plan.log)  # and the write tried again
        remote.plan.disarm()
        assert storage.read_versioned(path) == (expected, version)
    with pytest.raises(ConcurrentWriterError):  # a real conflict stays one
        storage.replace_if(path, b"stale", "1" if remote.kind == "gcs" else '"0"')
    with pytest.raises(FileExistsError):
        storage.create_exclusive(path, b"someone else")
