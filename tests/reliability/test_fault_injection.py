"""Injected faults (issue 7, part 2): every operation of a save fails in turn.

For each backend and each realistic error, the k-th operation of a save (and of opening a
manager) fails, for every k up to the number of operations of a clean save. Each time: the
error reaches the caller (unless it was transient and the operation is one anyckpt retries,
then the save succeeds), the latest checkpoint is intact and restores, no checkpoint retention
keeps is lost, and once the fault clears the next save works and a new manager finds the
directory clean.

Backends: ``faultfs://`` (an fsspec wrapper over memory://, as a plain filesystem: temporary
file + rename; and as an object store: files visible on close), local disk (faults in the
``os`` calls of anyckpt.storage: open, write, fsync, rename, link, unlink, listdir, pread),
the S3 test server (the k-th HTTP request answered with a real S3 error response or a
timeout, translated by botocore and s3fs as they translate AWS's), and the GCS emulator (the
k-th HTTP request of gcsfs answered, unsent, with a GCS JSON API error response, a read
timeout or a reset connection, translated by gcsfs as it translates GCS's).

Each backend's count of trials and faults is printed and recorded (``record_figures``); a
backend whose loop checked no fault point fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from os_seam import patch_os
from reliability_common import (
    LONG,
    assert_clean,
    assert_values,
    basename,
    record_figures,
    values,
)
from reliability_faults import (
    ERRORS,
    PLANS,
    FaultPlan,
    FaultyOs,
    GCSFaults,
    InjectedError,
    S3Faults,
    drop_tree,
    is_injected,
)

import anyckpt
import anyckpt.storage
from anyckpt import CheckpointManager, ConcurrentWriterError
from anyckpt.lease import LOCK_FILE
from anyckpt.storage import RetryPolicy, Storage, is_transient

pytestmark = pytest.mark.anyio

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.004)
KEEP = 2
SHARDS = 2
OPTIONS: dict[str, Any] = {
    "max_to_keep": KEEP,
    "format_options": {"num_shards": SHARDS},
    # No lease renewal during a test: the heartbeat's requests would be counted as the save's.
    "lease_seconds": 3600.0,
}

#: Errors injected per backend.
BACKEND_ERRORS = {
    "faultfs": ["ENOSPC", "EIO", "EACCES", "timeout", "ECONNRESET", "S3-503-SlowDown"],
    "faultfs-object": ["EIO", "EACCES", "S3-503-SlowDown", "S3-500-InternalError"],
    "local": ["ENOSPC", "EIO", "EACCES", "EROFS"],
    # Each trial costs HTTP round trips: two errors in CI, all four in the long mode.
    "s3": ["S3-503-SlowDown", "S3-403-AccessDenied"]
    + (["S3-500-InternalError", "timeout"] if LONG else []),
    # The same on the GCS emulator; the long mode adds throttling, the 502 gcsfs turns into
    # requests' ProxyError, a read timeout and a reset connection.
    "gcs": ["GCS-503-backendError", "GCS-403-forbidden"]
    + (
        ["GCS-429-rateLimitExceeded", "GCS-502-badGateway", "timeout", "ECONNRESET"] if LONG else []
    ),
}

_FIGURES: Counter[str] = Counter()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Rig:
    kind: str
    url: str
    options: dict[str, Any] | None
    plan: FaultPlan
    storage: Storage
    root: str
    retries: bool  # whether anyckpt retries transient errors here (remote filesystems)
    remote: tuple[S3Faults | GCSFaults, str] | None = None  # the HTTP faults, the bucket
    fired: Counter[str] = field(default_factory=Counter)

    def manager(self, **kwargs: Any) -> CheckpointManager:
        manager = CheckpointManager(self.url, storage_options=self.options, **{**OPTIONS, **kwargs})
        manager.storage.retry = FAST_RETRY
        if self.remote is not None:
            self.remote[0].attach(manager.storage.fs, self.remote[1])
        return manager

    def names(self) -> set[str]:
        self.plan.disarm()
        return set(self.storage.listdir(self.root))


@pytest.fixture(params=sorted(BACKEND_ERRORS))
def rig(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Rig]:
    kind = request.param
    plan = FaultPlan()
    monkeypatch.setattr(anyckpt.storage, "DEFAULT_RETRY", FAST_RETRY)
    if kind.startswith("faultfs"):
        name = uuid.uuid4().hex
        PLANS[name] = plan
        url = f"faultfs:///rel-{name[:12]}/ckpt"
        options = {"plan": name, "object_store": kind == "faultfs-object"}
        storage, root = Storage.from_url(url, options)
        yield Rig(kind, url, options, plan, storage, root, retries=True)
        plan.disarm()
        drop_tree(f"/rel-{name[:12]}")
        del PLANS[name]
    elif kind == "local":
        directory = tmp_path / "ckpt"
        patch_os(monkeypatch, FaultyOs(os, plan, str(directory)))
        storage, root = Storage.from_url(str(directory))
        yield Rig(kind, str(directory), None, plan, storage, root, retries=False)
        plan.disarm()
    elif kind == "gcs":
        bucket = request.getfixturevalue("gcs_bucket")
        # One try per request inside gcsfs, as inside s3fs and botocore above: what is retried
        # is anyckpt's doing (anyckpt's GCS backend wraps gcsfs's request in gcsfs's retry
        # loop again, with the filesystem's ``retries``).
        monkeypatch.setattr(fsspec.get_filesystem_class("gs"), "retries", 1)
        options = dict(bucket.storage_options)
        url = f"{bucket.url}/ckpt"
        storage, root = Storage.from_url(url, options)
        gcs = GCSFaults(plan)
        yield Rig(kind, url, options, plan, storage, root, retries=True, remote=(gcs, bucket.name))
        plan.disarm()
        gcs.detach()
    else:
        bucket = request.getfixturevalue("s3_bucket")
        # One try per request inside botocore and s3fs: what is retried is anyckpt's doing.
        options = {
            **bucket.storage_options,
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
        monkeypatch.setattr(fsspec.get_filesystem_class("s3"), "retries", 1)
        storage, root = Storage.from_url(f"{bucket.url}/ckpt", options)
        faults = S3Faults(plan)
        url = f"{bucket.url}/ckpt"
        yield Rig(
            kind, url, options, plan, storage, root, retries=True, remote=(faults, bucket.name)
        )
        plan.disarm()
        faults.detach()


#: Requests a client library makes on its own account and recovers from: s3fs's makedirs asks
#: whether the bucket exists, then tries to create it and accepts "already yours"; gcsfs's
#: info() sends a one-item listing (a probe) beside the object's GET, and uses its answer only
#: when the object is not there or its GET was refused.
ABSORBED = {"HeadBucket", "probe"}


def _absorbed(target: tuple[str, str] | None, error: str) -> bool:
    """Whether a fault at ``target`` may leave no trace: the client library recovered."""
    if target is None:
        return False
    # gcsfs answers an object's info() from a listing when the GET is refused (403).
    return target[0] in ABSORBED or (target[0] == "stat" and error == "GCS-403-forbidden")


def _streamed(target: tuple[str, str] | None) -> bool:
    """Operations anyckpt does not retry: the streamed writes of data files (the client
    library retries their requests itself). On S3 a data file is one upload from the
    caller's buffers, retried as a whole like every other request (anyckpt.storage.s3.S3Writer)."""
    whole = {"delete", "stat", "list", "read", "DeleteObject", "HeadObject", "GetObject"}
    whole |= {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"}
    return target is not None and ".data-" in target[1] and target[0] not in whole


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def _check_directory(rig: Rig, manager: CheckpointManager, floor: int) -> int:
    """What a reader sees (the state file, read independently): a latest checkpoint at least
    ``floor`` that restores with its step's values, and every checkpoint retention keeps (the
    newest KEEP tracked) restores. Returns the latest step."""
    rig.plan.disarm()
    state = await anyckpt.get_checkpoint_state(rig.url, storage_options=rig.options)
    assert state is not None
    latest = int(state.model_checkpoint_path.rsplit("-", 1)[1])
    assert latest >= floor
    assert manager.latest_step in (latest, floor)
    assert_values(
        await anyckpt.load(state.model_checkpoint_path, storage_options=rig.options), latest
    )
    kept = list(state.all_model_checkpoint_paths)[-KEEP:]
    assert kept[-1] == state.model_checkpoint_path
    for prefix in kept:
        step = int(prefix.rsplit("-", 1)[1])
        assert_values(await anyckpt.load(prefix, storage_options=rig.options), step)
    return latest


async def _count_ops(rig: Rig, manager: CheckpointManager, step: int) -> int:
    rig.plan.arm(None)
    await (await manager.save(values(step), step=step))
    count = rig.plan.count
    rig.plan.disarm()
    return count


async def test_every_operation_of_a_save_fails_in_turn(rig: Rig) -> None:
    trials = failed = retried = absorbed = 0
    for error in BACKEND_ERRORS[rig.kind]:
        transient = ERRORS[error][1] and rig.retries
        async with rig.manager() as manager:
            step = manager.latest_step or 0
            for _ in range(KEEP):
                step += 1
                await (await manager.save(values(step), step=step))
            step += 1
            total = await _count_ops(rig, manager, step)
            assert total >= 10, rig.plan.log
            for k in range(1, total + 1):
                before = manager.latest_step
                assert before is not None
                step += 1
                rig.plan.arm(k, error)
                outcome: BaseException | None = None
                try:
                    await (await manager.save(values(step), step=step))
                except Exception as exc:
                    outcome = exc
                fired, target = rig.plan.fired, rig.plan.target
                rig.plan.disarm()
                trials += 1
                if not fired:
                    assert outcome is None, outcome
                elif outcome is None and _absorbed(target, error):
                    absorbed += 1  # the client library's own request, which it recovered from
                elif transient and outcome is None:
                    retried += 1  # a whole-object operation, retried
                    assert not _streamed(target), target
                else:
                    # The error reaches the caller; transient errors only from streamed writes.
                    assert outcome is not None, (k, target)
                    assert is_injected(outcome), (k, target, _traceback(outcome))
                    assert not transient or _streamed(target), (k, target, outcome)
                    failed += 1
                rig.fired[error] += bool(fired)
                latest = await _check_directory(rig, manager, before)
                assert latest in (before, step)
                if outcome is None:
                    assert latest == step
                # The fault cleared: the next save works.
                step += 1
                await (await manager.save(values(step), step=step))
                assert manager.latest_step == step
                assert_values(await manager.restore(), step)
                # ...and retention caught up: only the newest KEEP are left (what the failed
                # save wrote is gone too, unless it committed).
                tracked = [basename(p) for p in manager.checkpoints]
                assert tracked == [f"ckpt-{s}" for s in range(step - KEEP + 1, step + 1)] or (
                    outcome is not None and tracked[-1] == f"ckpt-{step}"
                ), (tracked, k, target)
                assert_clean(rig.names(), tracked, num_shards=SHARDS, lock=True)
        # A new manager: the same latest, no debris, and it saves.
        async with rig.manager() as manager:
            assert manager.latest_step == step
            tracked = [basename(p) for p in manager.checkpoints]
            assert_clean(rig.names(), tracked, num_shards=SHARDS, lock=True)
            assert_values(await manager.restore(), step)
            step += 1
            await (await manager.save(values(step), step=step))
        assert_clean(
            rig.names(), [f"ckpt-{step - 1}", f"ckpt-{step}"], num_shards=SHARDS, lock=False
        )
    faults = sum(rig.fired.values())
    print(
        f"faults in saves, {rig.kind}: {trials} trials, {faults} faults, {failed} failed saves, "
        f"{retried} retried to success, {absorbed} absorbed ({BACKEND_ERRORS[rig.kind]})"
    )
    # An honest loop: it checked fault points, and faults fired at them.
    assert trials > 0, rig.kind
    assert faults > 0, (trials, dict(rig.fired))
    assert failed > 0
    if rig.retries:
        assert retried > 0
    _FIGURES[f"{rig.kind}:trials"] += trials
    _FIGURES[f"{rig.kind}:faults"] += faults
    record_figures(
        "faults-save",
        {"backend": rig.kind, "trials": trials, "faults": sum(rig.fired.values()),
         "failed_saves": failed, "retried_ok": retried, "absorbed_by_client": absorbed,
         "errors": BACKEND_ERRORS[rig.kind]},
    )  # fmt: skip


async def test_every_operation_of_opening_fails_in_turn(rig: Rig) -> None:
    """Opening a manager (lock, state file, listing, debris cleanup) fails at each operation:
    the error reaches the caller, nothing committed is touched, and the next open works."""
    async with rig.manager() as manager:
        for step in (1, 2, 3):
            await (await manager.save(values(step), step=step))
    trials = 0
    for error in BACKEND_ERRORS[rig.kind][:2]:
        # Debris for the opening manager to clean: an interrupted save of step 4.
        rig.plan.disarm()
        rig.storage.write_bytes(f"{rig.root}/ckpt-4.data-00000-of-00002", b"partial")
        rig.storage.write_bytes(f"{rig.root}/ckpt-4.index{anyckpt.storage.TEMP_MARKER}0bad", b"x")
        rig.plan.arm(None)
        async with rig.manager():
            pass
        total = rig.plan.count
        rig.plan.disarm()
        for k in range(1, total + 1):
            rig.storage.write_bytes(f"{rig.root}/ckpt-4.data-00000-of-00002", b"partial")
            rig.plan.arm(k, error)
            outcome: BaseException | None = None
            opened = total + 1  # the count of operations once the manager is open
            try:
                async with rig.manager() as manager:
                    assert manager.latest_step == 3
                    opened = rig.plan.count
            except Exception as exc:
                outcome = exc
            fired, target, fired_at = rig.plan.fired, rig.plan.target, rig.plan.fired_at
            rig.plan.disarm()
            trials += 1
            rig.fired[error] += bool(fired)
            if outcome is not None:
                assert is_injected(outcome), outcome
            elif fired:  # retried, or the release of the lock at exit (best effort)
                released = fired_at > opened
                assert target is not None
                absorbed = _absorbed(target, error)
                assert (ERRORS[error][1] and rig.retries) or released or absorbed, target
                assert not released or target[1].endswith(LOCK_FILE), target
            # Nothing committed was touched, and the lock was given back.
            async with rig.manager() as manager:
                assert manager.latest_step == 3
                assert [basename(p) for p in manager.checkpoints] == ["ckpt-2", "ckpt-3"]
                for step in (2, 3):
                    assert_values(await manager.restore(step), step)
                assert_clean(rig.names(), ["ckpt-2", "ckpt-3"], num_shards=SHARDS, lock=True)
            assert_clean(rig.names(), ["ckpt-2", "ckpt-3"], num_shards=SHARDS, lock=False)
    record_figures(
        "faults-open", {"backend": rig.kind, "trials": trials, "faults": sum(rig.fired.values())}
    )


async def test_a_gcs_data_upload_timeout_reaches_the_caller_with_its_cause(
    gcs_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file's upload to GCS times out (gcsfs's to retry, one try here): the save fails
    with fsspec's ``FSTimeoutError``, raised from aiohttp's timeout, and the caller gets that
    chain whole (the concurrent writes of the shards once dropped the cause, so nothing in
    the error said what had timed out). The previous checkpoint stays; the next save works."""
    monkeypatch.setattr(anyckpt.storage, "DEFAULT_RETRY", FAST_RETRY)
    monkeypatch.setattr(fsspec.get_filesystem_class("gs"), "retries", 1)
    plan = FaultPlan()
    faults = GCSFaults(plan)
    manager = CheckpointManager(
        f"{gcs_bucket.url}/ckpt", storage_options=gcs_bucket.storage_options, **OPTIONS
    )
    faults.attach(manager.storage.fs, gcs_bucket.name)
    try:
        async with manager:
            await (await manager.save(values(1), step=1))
            plan.only = lambda path: ".data-" in path
            plan.arm(1, "timeout")
            with pytest.raises(asyncio.TimeoutError) as info:
                await (await manager.save(values(2), step=2))
            target = plan.target
            plan.disarm()
            assert plan.fired == 1, plan.log
            assert target is not None
            assert ".data-" in target[1], target
            cause = info.value.__cause__
            assert isinstance(cause, InjectedError), _traceback(info.value)
            assert is_transient(cause)
            assert manager.latest_step == 1
            assert_values(await manager.restore(), 1)
            await (await manager.save(values(3), step=3))
            assert_values(await manager.restore(), 3)
    finally:
        faults.detach()


# -- retries ---------------------------------------------------------------------------------


def _faultfs(object_store: bool = True) -> tuple[str, dict[str, Any], FaultPlan]:
    name = uuid.uuid4().hex
    plan = PLANS[name] = FaultPlan()
    return f"faultfs:///retry-{name[:12]}/ckpt", {"plan": name, "object_store": object_store}, plan


async def test_transient_errors_are_retried_per_object_with_backoff(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Throttling on the index, the state file and a retention delete: each operation is tried
    again (the same object, from the same bytes) and the save succeeds; a warning per retry
    names the object."""
    monkeypatch.setattr(anyckpt.storage, "DEFAULT_RETRY", FAST_RETRY)
    url, options, plan = _faultfs()
    manager = CheckpointManager(url, storage_options=options, max_to_keep=1, lease_seconds=3600)
    async with manager:
        await (await manager.save(values(1), step=1))
        for step, target in [(2, "ckpt-2.index"), (3, "checkpoint"), (4, "ckpt-3.index")]:
            plan.only = lambda path, target=target: path.endswith("/" + target)
            plan.arm(1, "S3-503-SlowDown", times=FAST_RETRY.attempts - 1)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="anyckpt.storage"):
                await (await manager.save(values(step), step=step))
            assert plan.fired == FAST_RETRY.attempts - 1, (target, plan.log)
            retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
            assert len(retries) == FAST_RETRY.attempts - 1, retries
            assert all(target in message for message in retries), retries
            plan.disarm()
            assert_values(await manager.restore(), step)
    drop_tree(url.removeprefix("faultfs://").rsplit("/", 1)[0])


async def test_transient_errors_give_up_after_the_last_attempt(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that keeps timing out: the save fails with the timeout after a bounded number of
    tries of each operation, and works again once the store does."""
    monkeypatch.setattr(anyckpt.storage, "DEFAULT_RETRY", FAST_RETRY)
    url, options, plan = _faultfs()
    async with CheckpointManager(url, storage_options=options, lease_seconds=3600) as manager:
        await (await manager.save(values(1), step=1))
        plan.only = lambda path: path.endswith("/checkpoint")
        plan.ops = frozenset({"open"})  # the state file's upload
        plan.arm(1, "timeout", times=100)
        with (
            caplog.at_level(logging.WARNING, logger="anyckpt.storage"),
            pytest.raises(TimeoutError) as info,
        ):
            await (await manager.save(values(2), step=2))
        assert is_injected(info.value)
        assert plan.fired == FAST_RETRY.attempts, plan.log  # bounded
        last = f"retry {FAST_RETRY.attempts - 1} of {FAST_RETRY.attempts - 1}"
        assert any(last in r.getMessage() for r in caplog.records)
        assert not any(f"retry {FAST_RETRY.attempts} of" in r.getMessage() for r in caplog.records)
        plan.disarm()
        assert manager.latest_step == 1
        await (await manager.save(values(3), step=3))
        assert_values(await manager.restore(), 3)
    drop_tree(url.removeprefix("faultfs://").rsplit("/", 1)[0])


@pytest.mark.parametrize("error", ["ENOSPC", "EIO", "EACCES", "S3-403-AccessDenied"])
async def test_permanent_errors_are_not_retried(
    error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(anyckpt.storage, "DEFAULT_RETRY", FAST_RETRY)
    url, options, plan = _faultfs()
    async with CheckpointManager(url, storage_options=options, lease_seconds=3600) as manager:
        await (await manager.save(values(1), step=1))
        plan.only = lambda path: path.endswith("/checkpoint")
        plan.ops = frozenset({"open"})  # the state file's upload
        plan.arm(1, error, times=100)
        with pytest.raises(OSError, match=r".") as info:
            await (await manager.save(values(2), step=2))
        assert is_injected(info.value)
        assert plan.fired == 1  # tried once
        plan.disarm()
        assert manager.latest_step == 1
    drop_tree(url.removeprefix("faultfs://").rsplit("/", 1)[0])


async def test_a_conditional_write_applied_but_unanswered_is_not_a_conflict(
    s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock's and the state file's conditional PUTs reach S3, but the answer is lost (a
    read timeout after the server applied it). The retry finds the precondition broken; the
    object holding exactly the bytes written proves it was this write: no false conflict."""
    from botocore.exceptions import ReadTimeoutError

    monkeypatch.setattr(anyckpt.storage, "DEFAULT_RETRY", FAST_RETRY)
    options = {**s3_bucket.storage_options, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    monkeypatch.setattr(fsspec.get_filesystem_class("s3"), "retries", 1)
    storage, root = Storage.from_url(f"{s3_bucket.url}/ckpt", options)
    storage.fs.ls(s3_bucket.name, refresh=True)
    lost: list[str] = []

    def lose_answer(**kwargs: Any) -> None:
        if not lost:
            lost.append("PutObject")
            raise ReadTimeoutError(endpoint_url="(answer lost)")

    events = storage.fs.s3.meta.events
    events.register("before-parse.s3.PutObject", lose_answer, unique_id="lose-answer")
    try:
        version = storage.create_exclusive(f"{root}/lock", b"mine")
        assert lost == ["PutObject"]  # the first answer was lost, and retried
        assert storage.read_versioned(f"{root}/lock") == (b"mine", version)
        lost.clear()
        newer = storage.replace_if(f"{root}/lock", b"mine, renewed", version)
        assert lost == ["PutObject"]
        assert storage.read_versioned(f"{root}/lock") == (b"mine, renewed", newer)
        # A real conflict stays one.
        with pytest.raises(ConcurrentWriterError):
            storage.replace_if(f"{root}/lock", b"stale", version)
    finally:
        events.unregister("before-parse.s3.PutObject", unique_id="lose-answer")
