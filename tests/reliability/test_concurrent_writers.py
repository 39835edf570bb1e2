"""Concurrent writers (issue 7, part 3): two managers on one directory fail loudly.

Two managers in one process (two tasks, two threads), in two processes, and on two "hosts"
sharing an S3 bucket (a process that presents another machine identity): the second gets
ConcurrentWriterError before it reads or deletes anything, and the first one's checkpoints are
untouched. A writer whose lock or state file someone else changed fails its next commit instead
of overwriting it. A lock whose holder died is taken over (at once on the same machine, after
one unrenewed lease term from another host), and a live holder's lock never is, even with a
skewed clock. Readers polling ``latest_checkpoint`` during saves only ever load complete
checkpoints with the values of the step they name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import fsspec
import pytest
from reliability_common import assert_values, record_figures, values

import anyckpt
import anyckpt.cli
import anyckpt.lease
from anyckpt import CheckpointManager, CheckpointNotFoundError, ConcurrentWriterError
from anyckpt.codecs.state_file import CheckpointState, encode_state
from anyckpt.lease import LOCK_FILE, LocalLock
from anyckpt.storage import Storage

pytestmark = pytest.mark.anyio

WRITER = Path(__file__).resolve().parent / "writer_process.py"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Place:
    kind: str
    url: str
    options: dict[str, Any] | None

    def manager(self, **kwargs: Any) -> CheckpointManager:
        return CheckpointManager(self.url, storage_options=self.options, **kwargs)

    def storage(self) -> tuple[Storage, str]:
        return Storage.from_url(self.url, self.options)

    def names(self) -> set[str]:
        storage, root = self.storage()
        return set(storage.listdir(root))


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    yield from _place(request, request.param, tmp_path)


@pytest.fixture(params=["memory", "s3", "gcs"])
def leased(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    """Places whose lock is a lease (local disk has a flock instead)."""
    yield from _place(request, request.param, tmp_path)


def _place(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> Iterator[Place]:
    if kind == "local":
        yield Place("local", str(tmp_path / "ckpt"), None)
    elif kind == "memory":
        root = f"cw-{uuid.uuid4().hex[:12]}"
        yield Place("memory", f"memory://{root}/ckpt", None)
        store = fsspec.filesystem("memory").store
        for key in [k for k in store if k.startswith(f"/{root}/")]:
            del store[key]
    else:
        bucket = request.getfixturevalue(f"{kind}_bucket")
        yield Place(kind, f"{bucket.url}/ckpt", bucket.storage_options)


@pytest.fixture(params=["local", "s3"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    """Places other processes can reach."""
    if request.param == "local":
        return Place("local", str(tmp_path / "ckpt"), None)
    bucket = request.getfixturevalue("s3_bucket")
    return Place("s3", f"{bucket.url}/ckpt", bucket.storage_options)


def _spawn(place: Place, mode: str, **config: Any) -> subprocess.Popen[str]:
    config = {"url": place.url, "options": place.options, "mode": mode, **config}
    return subprocess.Popen(
        [sys.executable, str(WRITER), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _try_in_process(place: Place, **config: Any) -> dict[str, Any]:
    proc = _spawn(place, "try", **config)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _hold_in_process(place: Place, **config: Any) -> tuple[subprocess.Popen[str], int]:
    proc = _spawn(place, "hold", **config)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY "), line
    return proc, int(line.split()[1])


async def _saved(manager: CheckpointManager, *steps: int) -> None:
    for step in steps:
        await (await manager.save(values(step), step=step))


# -- the conditional writes underneath -------------------------------------------------------


async def test_conditional_writes(place: Place) -> None:
    """What the lock and the state file rely on, on each store: create only if absent, replace
    and delete only the version last seen (S3 If-None-Match/If-Match, GCS ifGenerationMatch;
    a hard link and a check on local disk; a process-wide lock on memory://)."""
    storage, root = place.storage()
    storage.makedirs(root)
    path = f"{root}/conditional"
    first = storage.create_exclusive(path, b"one")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(path, b"two")
    data, version = storage.read_versioned(path)
    assert (data, version) == (b"one", first)
    second = storage.replace_if(path, b"three", first)
    assert second != first
    with pytest.raises(ConcurrentWriterError):
        storage.replace_if(path, b"four", first)  # stale version
    with pytest.raises(ConcurrentWriterError):
        storage.replace_if(path, b"four", None)  # "only if absent"
    with pytest.raises(ConcurrentWriterError):
        storage.remove_if(path, first)
    assert storage.read_bytes(path) == b"three"
    storage.remove_if(path, second)
    assert not storage.exists(path)
    with pytest.raises(ConcurrentWriterError):
        storage.replace_if(path, b"five", second)  # it is gone
    assert storage.replace_if(path, b"six", None)
    assert storage.read_bytes(path) == b"six"


# -- one process -----------------------------------------------------------------------------


async def test_second_manager_of_a_process_fails_and_touches_nothing(place: Place) -> None:
    async with place.manager(max_to_keep=2) as first:
        await _saved(first, 1, 2, 3)
        names = place.names()
        assert LOCK_FILE in names
        with pytest.raises(ConcurrentWriterError, match="this process has this directory open"):
            async with place.manager(max_to_keep=1):
                pass
        assert place.names() == names  # read nothing, deleted nothing
        await _saved(first, 4)  # the first one is unaffected
        assert_values(await first.restore(), 4)
    assert LOCK_FILE not in place.names()
    async with place.manager(max_to_keep=2) as second:  # released: the next one opens
        assert second.latest_step == 4
        assert_values(await second.restore(3), 3)


async def test_two_threads_one_wins(place: Place) -> None:
    """Managers opened at the same moment from several threads (each with its own event
    loop): exactly one opens, the others fail."""
    results: list[str] = []
    barrier = threading.Barrier(4)
    hold = threading.Event()

    async def one() -> None:
        barrier.wait()
        try:
            async with place.manager() as manager:
                results.append("opened")
                if len(results) == 4:
                    hold.set()
                await (await manager.save(values(7), step=7))
                await anyio.to_thread.run_sync(hold.wait, 30)
        except ConcurrentWriterError:
            results.append("refused")
        finally:
            if len(results) == 4:  # the winner holds the directory until every thread tried
                hold.set()

    threads = [threading.Thread(target=anyio.run, args=(one,)) for _ in range(4)]
    for t in threads:
        t.start()
    await anyio.to_thread.run_sync(lambda: [t.join(60) for t in threads])
    assert sorted(results) == ["opened", "refused", "refused", "refused"]
    assert (await anyckpt.latest_checkpoint(place.url, storage_options=place.options)).endswith(
        "ckpt-7"
    )


# -- two processes, two hosts ----------------------------------------------------------------


async def test_second_process_fails_while_the_first_holds(shared: Place) -> None:
    holder, step = _hold_in_process(shared, lease_seconds=2.0)
    try:
        result = await anyio.to_thread.run_sync(lambda: _try_in_process(shared))
        assert result["opened"] is False
        assert result["error"] == "ConcurrentWriterError"
        assert f"process {holder.pid}" in result["message"]
        # ...and in this process too.
        with pytest.raises(ConcurrentWriterError, match=f"process {holder.pid}"):
            async with shared.manager():
                pass
        if shared.kind == "local":  # and `anyckpt prune`, which would delete checkpoints
            names = shared.names()
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = await anyio.to_thread.run_sync(
                    anyckpt.cli.main, ["prune", "--max-to-keep", "1", shared.url]
                )
            assert code != 0
            assert "is locked by process" in err.getvalue()
            assert shared.names() == names
    finally:
        holder.communicate("", timeout=60)  # stdin EOF: the holder closes normally
    assert holder.returncode == 0
    async with shared.manager() as manager:
        assert manager.latest_step == step
        assert_values(await manager.restore(), step)


def _race(tmp_path: Path, contenders: int, **config: Any) -> list[dict[str, Any]]:
    """Start ``contenders`` processes that open one directory at the same moment (each waits
    for a start file); the winner holds it until every other has answered. Their answers, in
    process order."""
    place = Place("local", str(tmp_path / "ckpt"), None)
    go = tmp_path / "go"
    procs = [_spawn(place, "race", go=str(go), **config) for _ in range(contenders)]
    try:
        go.touch()
        answers: list[dict[str, Any]] = []
        for proc in procs:
            assert proc.stdout is not None
            answers.append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.communicate(timeout=120)  # closes stdin: a holder lets go
    for proc in procs:
        assert proc.returncode == 0
    return answers


def _exactly_one_wins(answers: list[dict[str, Any]]) -> None:
    winners = [a for a in answers if a["opened"]]
    assert len(winners) == 1, answers
    winner = winners[0]
    for answer in answers:
        if answer is winner:
            continue
        assert answer["error"] == "ConcurrentWriterError", answer
        assert f"is locked by process {winner['pid']} on {winner['host']} " in answer["message"]


async def test_many_processes_race_exactly_one_wins(tmp_path: Path) -> None:
    """Six processes open one directory at once, and the winner holds it until all have
    answered: exactly one opens, the other five are refused naming it (pid and host)."""
    answers = await anyio.to_thread.run_sync(lambda: _race(tmp_path, 6))
    _exactly_one_wins(answers)


async def test_the_race_test_fails_without_the_lock(tmp_path: Path) -> None:
    """The negative control: with the lock skipped in every process (a test-only switch of
    writer_process.py), more than one opens and the check above fails."""
    answers = await anyio.to_thread.run_sync(lambda: _race(tmp_path, 6, unlocked=True))
    assert sum(a["opened"] for a in answers) > 1, answers
    with pytest.raises(AssertionError):
        _exactly_one_wins(answers)


def test_contender_waits_for_a_new_holder_to_name_itself(tmp_path: Path) -> None:
    """The window between a holder's flock and its name in the file: a contender arriving
    then reports the holder by name, not as an unreadable lock (CI once saw this race)."""
    storage, root = Storage.from_url(str(tmp_path))
    path = str(tmp_path / LOCK_FILE)
    unnamed = LocalLock(path)  # locked, the file still empty
    namer = threading.Timer(0.2, unnamed.write, args=(json.dumps({"pid": 4242}).encode(),))
    namer.start()
    try:
        with pytest.raises(ConcurrentWriterError, match="locked by process 4242"):
            anyckpt.lease.DirectoryLock(storage, root).acquire()
    finally:
        namer.join()
        unnamed.release()
    # Released: the next contender takes it.
    lock = anyckpt.lease.DirectoryLock(storage, root)
    lock.acquire()
    lock.release()


def test_holder_that_never_names_itself_is_reported_unnamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(anyckpt.lease, "_NAMING_GRACE_SECONDS", 0.1)
    storage, root = Storage.from_url(str(tmp_path))
    unnamed = LocalLock(str(tmp_path / LOCK_FILE))
    try:
        with pytest.raises(ConcurrentWriterError, match="empty or unreadable"):
            anyckpt.lease.DirectoryLock(storage, root).acquire()
    finally:
        unnamed.release()


async def test_another_host_on_the_same_bucket_fails_then_takes_over_a_dead_lease(
    s3_bucket: Any,
) -> None:
    """Host A holds the bucket directory; host B (another machine identity) fails at once.
    A dies (SIGKILL: its lease stays); B cannot prove A is gone, so it waits one lease term
    without renewal, then takes over."""
    place = Place("s3", f"{s3_bucket.url}/ckpt", s3_bucket.storage_options)
    holder, step = _hold_in_process(place, lease_seconds=1.0, machine="host-a")
    try:
        started = time.monotonic()
        # B watches up to 4 s; A renews every 0.25 s (margin against a loaded machine).
        result = _try_in_process(place, machine="host-b", lease_seconds=4.0)
        assert result["opened"] is False
        assert "is locked by process" in result["message"]
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait()
    assert LOCK_FILE in place.names()  # the dead holder's lease
    started = time.monotonic()
    result = _try_in_process(place, machine="host-b", lease_seconds=1.0)
    waited = time.monotonic() - started
    assert result == {"opened": True, "latest": step}
    assert waited >= 1.0  # one whole lease term watched
    record_figures("concurrency", {"takeover_after_seconds": round(waited, 2)})


async def test_a_live_lease_is_never_taken_over_even_with_a_skewed_clock(
    s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process's clock is an hour ahead: the holder's lease looks expired. It is watched,
    the holder renews it meanwhile, and the takeover is refused."""
    place = Place("s3", f"{s3_bucket.url}/ckpt", s3_bucket.storage_options)
    holder, _ = _hold_in_process(place, lease_seconds=1.0, machine="host-a")
    try:

        class Skewed:
            def __getattr__(self, name: str) -> Any:
                return getattr(time, name)

            @staticmethod
            def time() -> float:
                return time.time() + 3600

        monkeypatch.setattr(anyckpt.lease, "time", Skewed())
        monkeypatch.setattr(anyckpt.lease, "MACHINE", "host-b")
        with pytest.raises(ConcurrentWriterError, match="which renewed it"):
            async with place.manager(lease_seconds=4.0):  # watched up to 4 s
                pass
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0


async def test_a_dead_holder_on_this_machine_is_taken_over_at_once(s3_bucket: Any) -> None:
    place = Place("s3", f"{s3_bucket.url}/ckpt", s3_bucket.storage_options)
    holder, step = _hold_in_process(place, lease_seconds=600.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    async with place.manager(lease_seconds=600.0) as manager:
        assert time.monotonic() - started < 120  # far less than one lease term (600 s)
        assert manager.latest_step == step
        await _saved(manager, step + 1)


# -- a writer whose directory was changed behind its back -------------------------------------


async def test_lost_lease_fails_the_next_commit(leased: Place) -> None:
    """Someone replaced the lease (took the directory over): the holder's next save fails with
    ConcurrentWriterError, commits nothing and deletes nothing. (Local disk: the next test.)"""
    place = leased
    storage, root = place.storage()
    async with place.manager(lease_seconds=1.0, max_to_keep=1) as manager:
        await _saved(manager, 1)
        storage.write_bytes(f"{root}/{LOCK_FILE}", b'{"pid": 1, "host": "usurper"}')
        state_before = storage.read_bytes(f"{root}/checkpoint")
        await anyio.sleep(0.8)  # past half a term: the commit renews, or the heartbeat did
        with pytest.raises(ConcurrentWriterError):
            await (await manager.save(values(2), step=2))
        with pytest.raises(ConcurrentWriterError):  # and every later save, at once
            await manager.save(values(3), step=3)
        assert storage.read_bytes(f"{root}/checkpoint") == state_before
        assert {"ckpt-1.index", "ckpt-1.data-00000-of-00001"} <= place.names()
    assert LOCK_FILE in place.names()  # the usurper's lease was not released by the loser


async def test_state_file_changed_behind_the_managers_back(place: Place) -> None:
    """Another writer (TensorFlow's own manager, say, which takes no lock) rewrote the state
    file: the next commit refuses to overwrite it, and retention deletes nothing."""
    storage, root = place.storage()
    async with place.manager(max_to_keep=2) as manager:
        await _saved(manager, 1, 2)
        foreign = encode_state(CheckpointState("ckpt-1", ("ckpt-1",), (1.0,)))
        storage.write_bytes(f"{root}/checkpoint", foreign)
        with pytest.raises(ConcurrentWriterError, match="state file was changed"):
            await (await manager.save(values(3), step=3))
        assert storage.read_bytes(f"{root}/checkpoint") == foreign  # not overwritten
        assert {"ckpt-1.index", "ckpt-2.index"} <= place.names()  # nothing deleted


async def test_lock_file_removed_behind_the_managers_back(tmp_path: Path) -> None:
    place = Place("local", str(tmp_path / "ckpt"), None)
    async with place.manager() as manager:
        await _saved(manager, 1)
        os.unlink(tmp_path / "ckpt" / LOCK_FILE)
        with pytest.raises(ConcurrentWriterError, match="removed or replaced"):
            await (await manager.save(values(2), step=2))
        assert manager.latest_step == 1


# -- readers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "s3"])
async def test_readers_never_see_a_half_written_checkpoint(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A writer saves continuously (retention deleting behind it) while a reader in another
    thread polls latest_checkpoint() and loads what it names: every load is complete and has
    exactly that step's values. The only failure allowed is the checkpoint having been deleted
    by retention meanwhile, and then the latest has moved past it."""
    if kind == "local":
        place = Place("local", str(tmp_path / "ckpt"), None)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        place = Place("s3", f"{bucket.url}/ckpt", bucket.storage_options)
    seconds = 3.0 if kind == "local" else 4.0
    stop = threading.Event()
    loads: list[int] = []
    raced: list[int] = []

    def reader() -> None:
        async def poll() -> None:
            while not stop.is_set():
                prefix = await anyckpt.latest_checkpoint(place.url, storage_options=place.options)
                if prefix is None:
                    await anyio.sleep(0.005)
                    continue
                step = int(prefix.rsplit("-", 1)[1])
                try:
                    restored = await anyckpt.load(prefix, storage_options=place.options)
                except CheckpointNotFoundError:
                    now = await anyckpt.latest_checkpoint(place.url, storage_options=place.options)
                    assert now is not None
                    assert int(now.rsplit("-", 1)[1]) > step
                    raced.append(step)
                    continue
                assert_values(restored, step, big=4096)
                loads.append(step)
                await anyio.sleep(0.001)  # a poller, not a busy loop starving the writer

        try:
            anyio.run(poll)
        except BaseException as exc:
            errors.append(exc)

    errors: list[BaseException] = []
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        async with place.manager(max_to_keep=2) as manager:
            step = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                step += 1
                await manager.save(values(step, 4096), step=step)
            await manager.wait()
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert len(loads) >= 10, (loads, raced)
    assert len(set(loads)) >= 3  # it saw the directory move
    record_figures(
        "readers", {"backend": kind, "saves": step, "loads": len(loads), "raced": len(raced)}
    )
