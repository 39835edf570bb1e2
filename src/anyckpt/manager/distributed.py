"""The manager's multi-process paths (``CheckpointManager(..., coordinator=...)``).

A save, on every rank, in save order (all collectives of one save happen after those of the
save before, so every rank makes the same collectives in the same order):

1. ``gather`` the manifests on the primary (names, dtypes, shapes, pieces; or the error that
   kept the rank from preparing its state). The primary computes :func:`~.plan.make_plan` and
   ``scatter``s each rank its own share (:class:`~.plan.Assignment`), or the error that stops
   the save on every rank, which then stops having written nothing. (Every message grows with
   one rank's share, so a save moves O(world size × tensors) bytes, not the square.)
2. Every rank writes its share as its own data files, concurrently, to the shared storage.
3. ``gather`` on the primary (rank 0): each rank's index entries, or its error.
4. The primary, if every rank succeeded: writes the merged ``PREFIX.index`` (TensorFlow's
   ``MergeBundles``), the commit marker; then the state file (the commit); then applies
   retention. Otherwise it removes what was written and commits nothing.
5. ``broadcast`` of the outcome: the new tracked state, or which rank failed and why. Every
   rank's ``PendingSave`` resolves with it: success everywhere, or an error everywhere.

A rank that dies makes its peers' next collective fail at once (the connection closes); a
rank that hangs makes it time out. Either way the save fails on every surviving rank and is
not committed, unless the primary had already committed it (a failure of step 5 only): a
rank that misses the outcome reads the state file, which tells.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np

from .._concurrency import run_concurrently
from ..codecs.dtypes import enum_from_dtype
from ..distributed.base import CoordinationError, Coordinator, scatter
from ..distributed.plan import (
    Assignment,
    Extents,
    Item,
    Manifest,
    Plan,
    PlanError,
    assign,
    make_plan,
    shard_options,
)
from ..distributed.sharded import Sharded
from ..errors import CheckpointError, ConcurrentWriterError
from ..formats.sharded import tensor_nbytes
from ..formats.v2_data import DataFileEntries, write_data_file
from ..formats.v2_index import build_index
from ..formats.v2_layout import data_path, index_path
from ..partitioned import Partitioned, partitions_of
from ..save_control import too_big_to_copy
from ..tensors import as_named_tensor, flatten, key_to_bytes

if TYPE_CHECKING:
    from .core import CheckpointManager

from ..save_policy import SaveDecision
from .capture import capture
from .directory import Tracking
from .pending import PendingSave, SaveEvent, SaveQueue
from .steps import check_step

T = TypeVar("T")

#: What a rank's prepared state holds, by unit (name, extents or None).
Arrays = dict[tuple[bytes, "Extents | None"], np.ndarray]


@dataclass(frozen=True)
class _Hello:
    directory: str
    checkpoint_name: str
    format: str


@dataclass(frozen=True)
class _Start:
    state: Tracking | None
    last_step: int | None
    error: str | None = None
    mismatch: str | None = None  # the ranks did not open the same checkpoints


@dataclass(frozen=True)
class _Report:
    files: list[DataFileEntries] | None  # the index entries of this rank's data files
    nbytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class _Outcome:
    state: Tracking | None
    deleted: tuple[str, ...] = ()
    preserved: tuple[str, ...] = ()
    error: str | None = None


def check_manager(manager: CheckpointManager) -> None:
    """Refuse the options a multi-process save does not support (at construction)."""
    if manager.format.name != "v2":
        raise ValueError(f"a distributed save writes the V2 format, not {manager.format.name!r}")
    if manager.write_meta_graph:
        raise ValueError("write_meta_graph is not supported with a coordinator")
    shard_options(manager.format_options)


async def _call(function: Callable[..., T], *args: Any) -> T:
    """A blocking collective, in a worker thread. Not abandoned on cancellation: the group must
    stay in step, so a cancelled save waits for the collective (bounded by its timeout)."""
    return await anyio.to_thread.run_sync(function, *args)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- opening ---------------------------------------------------------------------------------


async def enter(
    manager: CheckpointManager,
    coordinator: Coordinator,
    open_directory: Callable[[], Awaitable[None]],
    saves: SaveQueue,
) -> None:
    """Every rank checks it opens the same directory; the primary opens it (reads the state
    file, removes what interrupted saves left); every rank adopts the primary's view."""
    hello = _Hello(manager.directory, manager.checkpoint_name, manager.format.name)
    hellos: list[_Hello] | None = await _call(coordinator.gather, hello, 0)
    if coordinator.rank == 0:
        assert hellos is not None
        mismatch = next(
            (
                f"every rank must open the same checkpoints: rank 0 has {hellos[0]}, "
                f"rank {rank} has {other}"
                for rank, other in enumerate(hellos)
                if other != hellos[0]
            ),
            None,
        )
        failure: Exception | None = None
        if mismatch is None:
            try:
                await open_directory()
            except Exception as exc:
                failure = exc
        start = _Start(
            None if failure or mismatch else manager.checkpoint_dir.state,
            saves.last_step,
            _describe(failure) if failure else None,
            mismatch,
        )
        await _call(coordinator.broadcast, start, 0)
        if mismatch is not None:
            raise ValueError(mismatch)
        if failure is not None:
            raise failure
        return
    start = await _call(coordinator.broadcast, None, 0)
    if start.mismatch is not None:
        raise ValueError(start.mismatch)
    if start.error is not None or start.state is None:
        raise CheckpointError(
            f"rank 0 could not open the checkpoints: {start.error}", path=manager.directory
        )
    manager.checkpoint_dir.adopt(start.state)
    saves.resume(start.last_step)


# -- saving ----------------------------------------------------------------------------------


def prepare_state(state: Mapping[Any, Any]) -> tuple[tuple[Item, ...], Arrays]:
    """Flatten and normalise one rank's state: what it holds (whole tensors and pieces) and
    the arrays of each."""
    arrays: Arrays = {}
    items: list[Item] = []

    def hold(raw: bytes, extents: Extents | None, shape: tuple[int, ...], array: Any) -> None:
        arrays[(raw, extents)] = array
        items.append(Item(raw, extents, enum_from_dtype(array.dtype), shape, tensor_nbytes(array)))

    for name, value in flatten(state).items():
        raw = key_to_bytes(name)
        if isinstance(value, Sharded):
            if 0 in value.global_shape:  # nothing to split: an empty tensor, whole
                hold(raw, None, value.global_shape, np.empty(value.global_shape, value.dtype))
            elif value.size:  # an empty piece (nothing of an uneven split) holds nothing
                hold(raw, value.extents, value.global_shape, value.local)
            continue
        array = as_named_tensor(name, value)
        if partitions_of(array):  # a Partitioned (full value): a rank holding every piece
            assert isinstance(array, Partitioned)
            for extents, piece in array.pieces():
                hold(raw, extents, tuple(array.shape), piece)
        else:
            hold(raw, None, tuple(array.shape), array)
    return tuple(sorted(items)), arrays


async def _capture(arrays: Arrays) -> Arrays:
    """Copy every array once (the manager's capture: C order, over worker threads)."""

    labels = {f"{i}": unit for i, unit in enumerate(arrays)}
    copied = await capture({label: arrays[unit] for label, unit in labels.items()})
    return {unit: copied[label] for label, unit in labels.items()}


async def save(
    manager: CheckpointManager,
    coordinator: Coordinator,
    saves: SaveQueue,
    decide: Callable[[int, int | None], SaveDecision],
    state: Mapping[Any, Any],
    step: int | None,
    copy: bool,
) -> PendingSave:
    """``CheckpointManager.save`` with a coordinator. A rank that fails here still takes part
    in the save's collectives (as a failed rank), so its peers fail at once too. ``decide``
    is the manager's save policy (``checkpoint_interval``): every rank decides alike."""

    entered = time.perf_counter()
    saves.check_running()
    failure: Exception | None = None
    try:
        saves.raise_unobserved()
        manager.checkpoint_dir.check_lock()  # taken over (primary): say so now, not later
    except Exception as exc:
        failure = exc
    following = saves.following()
    try:
        step = following if step is None else check_step(step)
    except TypeError as exc:  # still takes part in the collectives, as a failed rank
        step = following
        failure = failure or exc
    if failure is None:
        try:
            saves.check_order(step)
        except ValueError as exc:
            failure = exc
    if failure is None:
        decision = decide(step, saves.last_saved_step)
        if not decision.save:  # every rank skips alike (same steps, same state): no collective
            return saves.skip(step, decision.reason)
    await saves.slots.acquire()
    items: tuple[Item, ...] = ()
    arrays: Arrays = {}
    capture_seconds = 0.0
    released: anyio.Event | None = None
    try:
        if failure is None:
            try:
                items, arrays = prepare_state(state)
                # Too big to copy: written from the caller's arrays while the caller waits.
                if copy and too_big_to_copy(sum(int(a.nbytes) for a in arrays.values())):
                    copy, released = False, anyio.Event()
                started = time.perf_counter()
                if copy:
                    arrays = await _capture(arrays)
                capture_seconds = time.perf_counter() - started
            except Exception as exc:
                failure = exc
    except BaseException:
        saves.slots.release()
        raise
    name = f"{manager.checkpoint_name}-{step}"
    pending = PendingSave(step, manager.checkpoint_dir.public(name))
    manifest = Manifest(name, items, None if failure is None else _describe(failure))
    saves.start(
        pending,
        partial(
            _write_and_commit,
            manager,
            coordinator,
            saves,
            pending,
            manifest,
            arrays,
            capture_seconds,
            entered,
            released,
        ),
    )
    if failure is not None:
        saves.mark_seen(pending)  # raised here; the save's own outcome says the same
        raise failure
    if released is not None:  # staged: the caller's arrays are in use until written
        await released.wait()
    return pending


async def _write_and_commit(
    manager: CheckpointManager,
    coordinator: Coordinator,
    saves: SaveQueue,
    pending: PendingSave,
    manifest: Manifest,
    arrays: Arrays,
    capture_seconds: float,
    entered: float,
    released: anyio.Event | None,
    previous: anyio.Event | None,
) -> None:
    """The save's collectives, this rank's data files and the commit, in the background.
    ``released`` (a staged save, not copied) is set once this rank's arrays are written (or
    the write failed): the caller waits for it."""

    error: BaseException | None = None
    name = manifest.name
    rank = coordinator.rank
    blocked_seconds = time.perf_counter() - entered  # save() returned (unless staged)
    try:
        if previous is not None:
            await previous.wait()  # collectives in save order on every rank
        started = time.perf_counter()
        async with saves.commit_lock:
            # 1. The plan: made by the primary, each rank told its own share.
            manifests = await _call(coordinator.gather, manifest, 0)
            plan: Plan | None = None
            assignments: list[Assignment] | None = None
            if manifests is not None:
                plan, assignments = _plan(
                    manifests, pending.step, shard_options(manager.format_options)
                )
            mine: Assignment = await _call(scatter, coordinator, assignments, 0)
            if manifest.error is not None:
                raise CheckpointError(f"save of step {pending.step}: {manifest.error}")
            if mine.error is not None:
                raise (PlanError if mine.plan_error else CheckpointError)(mine.error)
            # 2. This rank's data files.
            written: list[str] = []
            local_error: Exception | None = None
            files: list[DataFileEntries] = []
            try:
                files = await _write_files(
                    manager, name, mine.num_shards, mine.files_of(manifest.items), arrays, written
                )
            except Exception as exc:
                local_error = exc
                with anyio.CancelScope(shield=True):
                    for path in written:
                        await anyio.to_thread.run_sync(manager.storage.remove, path)
            nbytes = sum(int(f.sizes.sum()) for f in files)  # what this rank wrote
            del arrays
            if released is not None:
                released.set()
                blocked_seconds = time.perf_counter() - entered  # save() waited for the write
            report = _Report(
                None if local_error else files,
                nbytes,
                None if local_error is None else _describe(local_error),
            )
            wrote = time.perf_counter()
            # 3.-5. The primary merges and commits; everybody learns the outcome.
            if rank == 0:
                assert plan is not None
                outcome = await _primary_commit(
                    manager, coordinator, pending.step, name, plan, report, local_error
                )
            else:
                outcome = await _follow(
                    manager, coordinator, pending.step, name, report, local_error
                )
        pending.event = SaveEvent(
            pending.step,
            manager.checkpoint_dir.public(name),
            nbytes,
            capture_seconds,
            wrote - started,
            time.perf_counter() - wrote,
            outcome.deleted,
            outcome.preserved,
            blocked_seconds,
            staged=released is not None,
        )
        if manager.on_event is not None:
            manager.on_event(pending.event)
    except BaseException as exc:
        error = exc
        if not isinstance(exc, Exception):
            raise
    finally:
        if released is not None:
            released.set()  # the write never started (a failed collective): free the caller
        saves.slots.release()
        SaveQueue.finish(pending, error)


def _plan(
    manifests: list[Manifest], step: int, options: Any
) -> tuple[Plan | None, list[Assignment]]:
    """The primary's planning: the plan and each rank's share, or the error every rank gets."""
    world = len(manifests)

    def everyone(error: str, plan_error: bool = False) -> tuple[None, list[Assignment]]:
        return None, [Assignment(error=error, plan_error=plan_error)] * world

    for other_rank, other in enumerate(manifests):
        if other.error is not None:
            return everyone(f"save of step {step} failed on rank {other_rank}: {other.error}")
        if other.name != manifests[0].name:
            return everyone(
                f"ranks save different checkpoints: rank 0 {manifests[0].name!r}, "
                f"rank {other_rank} {other.name!r}",
                plan_error=True,
            )
    try:
        plan = make_plan(manifests, options)
    except PlanError as exc:
        return everyone(str(exc), plan_error=True)
    except Exception as exc:
        return everyone(f"save of step {step} could not be planned: {_describe(exc)}")
    return plan, assign(plan, manifests)


async def _write_files(
    manager: CheckpointManager,
    name: str,
    num_shards: int,
    shards: list[tuple[int, tuple[Item, ...]]],
    arrays: Arrays,
    written: list[str],
) -> list[DataFileEntries]:
    """Write this rank's data files concurrently; return their index entries."""
    prefix = manager.checkpoint_dir.path(name)
    storage = manager.storage
    directory = posixpath.dirname(prefix)
    if directory:
        await anyio.to_thread.run_sync(storage.makedirs, directory)
    files: list[DataFileEntries] = []

    async def one(shard: int, items: tuple[Item, ...]) -> None:
        path = data_path(prefix, shard, num_shards)
        found = await anyio.to_thread.run_sync(
            write_data_file,
            storage,
            path,
            [item.data_key for item in items],
            [arrays[item.unit] for item in items],
            manager.durable,
            shard,
            anyio.from_thread.check_cancelled,
        )
        written.append(path)
        files.append(found)

    # One clear error, not a group.
    await run_concurrently(partial(one, shard, items) for shard, items in shards)
    return files


async def _primary_commit(
    manager: CheckpointManager,
    coordinator: Coordinator,
    step: int,
    name: str,
    plan: Plan,
    report: _Report,
    local_error: Exception | None,
) -> _Outcome:
    reports: list[_Report] | None = None
    outcome: _Outcome
    failure: BaseException | None = local_error
    try:
        reports = await _call(coordinator.gather, report, 0)
    except CoordinationError as exc:
        failure = exc  # nothing is committed: clean up below, tell whoever still listens
    assert reports is not None or failure is not None
    if failure is None and reports is not None:
        failed = [(r, rep.error) for r, rep in enumerate(reports) if rep.error is not None]
        if failed:
            r, message = failed[0]
            others = f" (and on ranks {', '.join(str(f[0]) for f in failed[1:])})"
            failure = CheckpointError(
                f"save of step {step} failed on rank {r}: {message}"
                + (others if len(failed) > 1 else "")
            )
        else:
            try:
                await _write_index(manager, name, plan, reports)
                deleted, preserved = await manager.checkpoint_dir.commit(name)
            except Exception as exc:
                failure = exc
            else:
                outcome = _Outcome(manager.checkpoint_dir.state, deleted, preserved)
    if failure is not None:
        if manager.checkpoint_dir.state.latest != name and not isinstance(
            failure, ConcurrentWriterError
        ):
            # (After a ConcurrentWriterError the directory is someone else's: touch nothing.)
            await manager.checkpoint_dir.discard(name)
        outcome = _Outcome(None, error=f"rank 0: {_describe(failure)}")
    try:
        await _call(coordinator.broadcast, outcome, 0)
    except CoordinationError as exc:
        if failure is None:  # committed and durable, but some rank may not know
            raise CoordinationError(
                f"step {step} was committed, but telling the other ranks failed: {exc}"
            ) from exc
    if failure is not None:
        raise failure
    return outcome


async def _follow(
    manager: CheckpointManager,
    coordinator: Coordinator,
    step: int,
    name: str,
    report: _Report,
    local_error: Exception | None,
) -> _Outcome:
    try:
        await _call(coordinator.gather, report, 0)
        outcome: _Outcome = await _call(coordinator.broadcast, None, 0)
    except CoordinationError as exc:
        if local_error is not None:
            raise local_error from exc
        # The outcome is unknown: the state file tells whether the primary committed.
        if await _committed(manager, name):
            await manager.checkpoint_dir.load()
            return _Outcome(manager.checkpoint_dir.state)
        raise
    if outcome.error is not None or outcome.state is None:
        if local_error is not None:
            raise local_error
        raise CheckpointError(f"save of step {step} was not committed: {outcome.error}")
    manager.checkpoint_dir.adopt(outcome.state)
    return outcome


async def _committed(manager: CheckpointManager, name: str) -> bool:
    try:
        return await manager.checkpoint_dir.committed(name)
    except Exception:
        return False


async def _write_index(
    manager: CheckpointManager, name: str, plan: Plan, reports: list[_Report]
) -> None:
    """Merge the ranks' index entries into one ``PREFIX.index`` (the commit marker)."""
    files: list[DataFileEntries] = []
    for report in reports:
        assert report.files is not None
        files += report.files
    written = [key for f in files for key in f.keys]
    missing = plan.data_keys() - set(written)
    if missing:
        raise CheckpointError(f"{len(missing)} planned tensors were not written")
    if len(set(written)) != len(written) or set(written) & set(plan.holders):
        raise CheckpointError("a tensor was written twice: the ranks' plans differ")
    table = await anyio.to_thread.run_sync(build_index, plan.num_shards, files, plan.holders)
    prefix = manager.checkpoint_dir.path(name)
    storage = manager.storage
    await anyio.to_thread.run_sync(
        lambda: storage.write_bytes(index_path(prefix), table, durable=manager.durable)
    )
    if manager.durable:
        await anyio.to_thread.run_sync(storage.sync_directory, posixpath.dirname(prefix))


# -- retention without a save ----------------------------------------------------------------


async def sweep(
    manager: CheckpointManager, coordinator: Coordinator, saves: SaveQueue
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``CheckpointManager.sweep`` with a coordinator: the primary applies retention, every
    rank adopts the result. Every rank calls it (after its saves are committed)."""
    await saves.wait()
    async with saves.commit_lock:
        if coordinator.rank == 0:
            failure: Exception | None = None
            deleted: tuple[str, ...] = ()
            preserved: tuple[str, ...] = ()
            try:
                deleted, preserved = await manager.checkpoint_dir.sweep()
            except Exception as exc:
                failure = exc
            outcome = _Outcome(
                manager.checkpoint_dir.state if failure is None else None,
                deleted,
                preserved,
                None if failure is None else _describe(failure),
            )
            await _call(coordinator.broadcast, outcome, 0)
            if failure is not None:
                raise failure
            return deleted, preserved
        outcome = await _call(coordinator.broadcast, None, 0)
        if outcome.error is not None or outcome.state is None:
            raise CheckpointError(f"rank 0 could not apply retention: {outcome.error}")
        manager.checkpoint_dir.adopt(outcome.state)
        return outcome.deleted, outcome.preserved
