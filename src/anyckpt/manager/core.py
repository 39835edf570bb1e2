"""The async :class:`CheckpointManager`: background saves, the state file, retention, restore.

Commit protocol (see docs/manager.md), for every save:

1. capture: copy the tensors (one memcpy, in worker threads) — ``save()`` returns here;
2. write every data shard, then the index (local: temp name + fsync + rename; object stores:
   each object one atomic upload, written after the data it points to);
3. only then rewrite the ``checkpoint`` state file atomically (local: temp + fsync + rename +
   directory fsync);
4. only then delete what retention dropped (each checkpoint's commit marker first).

A crash at any point leaves ``latest_checkpoint`` pointing at a complete checkpoint. What an
interrupted save leaves behind is removed when the next manager opens the directory — only
files named like this manager's checkpoints, never anything else.

One writer per directory (see :mod:`anyckpt.lease` and docs/reliability.md): a manager takes the
directory's lock before it reads or changes anything, confirms it before each state-file write,
and writes the state file only if it is still the version the manager last read or wrote; a
second writer gets :class:`~anyckpt.ConcurrentWriterError` instead of deleting checkpoints.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import anyio.to_thread
import numpy as np

from .._concurrency import on_event_loop
from ..api import with_object_graph, write_meta_file
from ..codecs import DecodeError
from ..codecs.metrics import (
    MAX_METRICS_SIZE,
    check_metrics,
    encode_metrics,
)
from ..errors import (
    CheckpointNotFoundError,
    ConcurrentWriterError,
    CorruptCheckpointError,
)
from ..formats import get_format, loaded_format
from ..formats.base import CheckpointFormat, Index, check_options, checkpoint_path, read_slices
from ..formats.layout import metrics_path
from ..meta import saver_version
from ..retention import (
    Candidate,
    Policy,
    RetentionPolicy,
    tf_policy,
)
from ..save_control import SaveControl, SaveTicket  # hook: save policies (issue 16)
from ..storage import Storage
from ..tensors import prepare
from ..tree import flatten_tree, needs_tree, nest_names, rebuild, restore_into  # hook: structures
from . import distributed as multiprocess
from .capture import capture
from .directory import CheckpointDirectory
from .pending import PendingSave, SaveEvent, SaveQueue
from .steps import check_step

if TYPE_CHECKING:
    from ..distributed import Coordinator

_T = TypeVar("_T")


class CheckpointManager:
    """Keeps the checkpoints of one training run in ``directory``, as TensorFlow's
    ``tf.train.CheckpointManager`` does, with saves written in the background.

    Use it as ``async with CheckpointManager(directory, ...) as manager:``. ``directory``
    is a local path or fsspec URL. Checkpoints are ``DIR/{checkpoint_name}-{step}``; the
    ``checkpoint`` state file is TensorFlow's and interchangeable with it.

    Args:
        max_to_keep: keep the newest N committed checkpoints (None keeps all).
        keep_checkpoint_every_n_hours: preserve (keep forever, stop tracking) a checkpoint
            leaving the window if it is at least this many hours after the last preserved.
        checkpoint_name: file-name prefix of the checkpoints.
        format: any registered format (``"v2"`` by default).
        max_pending: saves in flight before ``save()`` waits; bounds the memory held by
            captured states.
        checkpoint_interval: skip a save that comes fewer than this many steps after the
            last one (TensorFlow's option).
        storage_options: passed to fsspec.
        durable: fsync files and directories (local disk) before a save counts as committed.
        clock: the time source for timestamps (``time.time``), injectable for tests.
        on_event: called with a :class:`SaveEvent` after each committed save.
        format_options: passed to the format's ``write`` (e.g. sharding options).
        lease_seconds: on object stores (and any filesystem but local disk), how long the
            directory's lock lasts unless renewed; the manager renews it every quarter of
            that. A manager finding a lock that looks expired watches it this long before
            taking it over. See docs/reliability.md.
        write_meta_graph: also write TensorFlow's ``PREFIX.meta`` (a MetaGraphDef whose
            SaverDef is this configuration) with every checkpoint; see docs/meta-graph.md.
        retention: a composable retention policy (:mod:`anyckpt.retention`: ``LatestN``,
            ``BestN``, ``Any``...) instead of TensorFlow's pair; the latest checkpoint is
            always kept. Leave ``max_to_keep`` and ``keep_checkpoint_every_n_hours`` at their
            defaults when passing it.
        coordinator: save from several processes (:mod:`anyckpt.distributed`): every rank
            writes its own shards, rank 0 merges the index, commits and applies retention;
            see docs/distributed.md. Every rank makes the same calls in the same order.
        object_graph: save each state as a TF2 object tree with its
            ``_CHECKPOINTABLE_OBJECT_GRAPH`` (and a ``save_counter`` of the step unless the
            tree has one), for ``tf.train.Checkpoint`` / ``tf.train.CheckpointManager``;
            see docs/tensorflow.md. Not with a ``coordinator``.
        allow_symlinks: read checkpoint files that are symbolic links leaving the directory
            (``restore``); refused with UnsafePathError by default (docs/reliability.md).
        save_policy: which saves write (:mod:`anyckpt.save_policy`: ``IntervalSteps``,
            ``IntervalSeconds``, ``AtSteps``, ``AnyOf``); the others return a skipped
            ``PendingSave``. ``checkpoint_interval=n`` is ``IntervalSteps(n)``.
        save_on_signal: signals (``(signal.SIGTERM,)``) after which the next ``save()`` writes
            whatever the save policy says (:mod:`anyckpt.preemption`); the handlers are set
            on entering (main thread) and restored on leaving. ``manager.preemption.received``
            tells the loop to stop.
        max_pending_bytes: bytes of captured copies not yet written before ``save()`` waits
            (or, with ``block=False``, raises ``SaveWouldBlockError``).
        stale_check: with ``save(copy=False)``, digest the arrays when saved and fail the
            save (:class:`~anyckpt.staleness.StaleSnapshotError`) if they changed before its
            commit: ``"sample"`` (default), ``"full"`` or None (off).
    """

    def __init__(
        self,
        directory: str | Any,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        format: str = "v2",
        max_pending: int = 1,
        storage_options: dict[str, Any] | None = None,
        *,
        checkpoint_interval: int | None = None,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[SaveEvent], None] | None = None,
        format_options: Mapping[str, Any] | None = None,
        lease_seconds: float = 60.0,
        write_meta_graph: bool = False,
        coordinator: Coordinator | None = None,
        object_graph: bool = False,
        retention: Policy | None = None,
        allow_symlinks: bool = False,
        save_policy: Any = None,
        save_on_signal: Sequence[int] | None = None,
        max_pending_bytes: int | None = None,
        stale_check: Any = "sample",
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if not checkpoint_name or "/" in checkpoint_name or ":" in checkpoint_name:
            raise ValueError(f"bad checkpoint_name {checkpoint_name!r}")
        if checkpoint_interval is not None and checkpoint_interval < 1:
            raise ValueError("checkpoint_interval must be a positive number of steps")
        self.policy = RetentionPolicy(max_to_keep, keep_checkpoint_every_n_hours)
        if retention is not None:
            if max_to_keep != 5 or keep_checkpoint_every_n_hours is not None:
                raise ValueError(
                    "pass either retention= or max_to_keep/keep_checkpoint_every_n_hours"
                )
            if not isinstance(retention, Policy):
                raise TypeError(f"retention must be an anyckpt.retention policy: {retention!r}")
        #: What a sweep keeps (None: everything). TF's pair unless ``retention`` is given.
        self.retention = (
            retention
            if retention is not None
            else tf_policy(max_to_keep, keep_checkpoint_every_n_hours)
        )
        self.directory = str(directory).rstrip("/") or "/"
        self.checkpoint_name = checkpoint_name
        # A plugin format loads with the plugins (entry points scanned, every plugin imported):
        # blocking work, done on entering in a worker thread when constructed on an event loop.
        self._format_name = format
        self._format = loaded_format(format)
        if self._format is None and (coordinator is not None or not on_event_loop()):
            self._format = get_format(format)
        self.max_pending = max_pending
        self.checkpoint_interval = checkpoint_interval
        self.durable = durable
        self.clock = clock
        self.on_event = on_event
        self.format_options = dict(format_options or {})
        self.write_meta_graph = write_meta_graph
        self._given_options = dict(self.format_options)  # as checked against the format
        if self._format is not None:
            self._check_format(self._format)
        self.coordinator = coordinator
        self.object_graph = object_graph
        if object_graph:
            if coordinator is not None:
                raise ValueError("object_graph=True is not supported with a coordinator")
            self.format_options.setdefault("data_order", "given")
        # hook: save policies, preemption, max_pending_bytes, stale check (anyckpt.save_control)
        self._control = SaveControl(
            save_policy=save_policy,
            checkpoint_interval=checkpoint_interval,
            save_on_signal=save_on_signal,
            max_pending_bytes=max_pending_bytes,
            stale_check=stale_check,
            clock=clock,
        )
        self.preemption = self._control.preemption
        if coordinator is not None and self._control.configured:
            raise ValueError(
                "save_policy, save_on_signal and max_pending_bytes are not "
                "supported with a coordinator yet"
            )
        if coordinator is not None:
            multiprocess.check_manager(self)
        # Opened on entering (in a worker thread: the first s3:// imports s3fs and aiobotocore,
        # ~0.2 s that must not stall the event loop), or on first use of ``storage``.
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be positive")
        self.lease_seconds = float(lease_seconds)
        #: The directory's lock, tracking, state file and commit sequence.
        self.checkpoint_dir = CheckpointDirectory(
            self, storage_options, allow_symlinks=allow_symlinks
        )
        #: Step numbers, slots, commit order and unseen errors of the saves in flight.
        self._saves = SaveQueue(max_pending)
        self._lifetime: AbstractAsyncContextManager[CheckpointManager] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def format(self) -> CheckpointFormat:
        """The format saves write (resolved from its name at construction, or on entering when
        a plugin format is named on an event loop; here if asked before that)."""
        if self._format is None:
            self._set_format(get_format(self._format_name))
        assert self._format is not None
        return self._format

    @format.setter
    def format(self, fmt: CheckpointFormat) -> None:
        self._format = fmt

    def _check_format(self, fmt: CheckpointFormat) -> None:
        check_options(fmt, self._given_options)
        if self.write_meta_graph:
            saver_version(fmt)  # only formats TensorFlow's Saver writes get a .meta

    def _set_format(self, fmt: CheckpointFormat) -> None:
        if self._format is None:
            self._check_format(fmt)
            self._format = fmt

    @property
    def storage(self) -> Storage:
        """The directory's storage (opened on entering the manager, or here on first use)."""
        return self.checkpoint_dir.storage

    async def __aenter__(self) -> CheckpointManager:
        if self._lifetime is not None:
            raise RuntimeError("a CheckpointManager can be entered once")
        self._lifetime = self._open()
        return await self._lifetime.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._lifetime is not None
        return await self._lifetime.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[CheckpointManager]:
        """The manager's life: signal handlers, storage, the directory (lock, state, debris
        cleaned), the task group of background saves; then all of it released in reverse.

        After an ordinary error in the body, the captured saves still finish and commit, and
        the body's error propagates unchanged, noting any background save that failed unseen;
        after a clean body, such a failure is raised. A cancellation stops the saves."""
        self._control.enter()  # hook: preemption — signal handlers (main thread)
        try:
            if self._format is None:  # a plugin named on the event loop: load it off the loop
                self._set_format(await anyio.to_thread.run_sync(get_format, self._format_name))
            await self.checkpoint_dir.open_storage()
            if self.coordinator is None:
                await self._open_directory()
            else:
                await multiprocess.enter(self, self.coordinator, self._open_directory, self._saves)
            try:
                async with self._saves.running():
                    yield self
            except Exception as exc:
                self._saves.note_unobserved(exc)
                raise
            self._saves.raise_unobserved()
        finally:
            await self.checkpoint_dir.close()
            self._control.exit()  # hook: preemption — previous handlers back

    async def _open_directory(self) -> None:
        """Take the lock, read the state file and remove what interrupted saves left (with a
        coordinator: on rank 0, the others adopt its view)."""
        await self.checkpoint_dir.open()
        self._saves.resume(self.checkpoint_dir.last_step)

    # -- state -------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return self.checkpoint_dir.path(name)

    def _public(self, name: str) -> str:
        return self.checkpoint_dir.public(name)

    def _step_of(self, name: str) -> int | None:
        return self.checkpoint_dir.step_of(name)

    # -- public view -------------------------------------------------------------------------

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint's prefix (``DIR/ckpt-STEP``), or None."""
        return (
            self._public(self.checkpoint_dir.state.latest)
            if self.checkpoint_dir.state.latest
            else None
        )

    @property
    def checkpoints(self) -> list[str]:
        """Prefixes of the committed checkpoints retention tracks, oldest first. A save still
        being written is not among them until it commits: ``await wait()`` first to see it."""
        return [self._public(t.path) for t in self.checkpoint_dir.state.tracked]

    @property
    def latest_step(self) -> int | None:
        return (
            self._step_of(self.checkpoint_dir.state.latest)
            if self.checkpoint_dir.state.latest
            else None
        )

    # -- saving ------------------------------------------------------------------------------

    async def save(
        self,
        state: Mapping[Any, Any],
        step: int | None = None,
        *,
        copy: bool = True,
        metrics: Mapping[str, float] | None = None,
        block: bool = True,
    ) -> PendingSave:
        """Capture ``state`` and write it in the background; return once it is captured.

        ``state`` maps names to arrays (nested mappings become ``a/b/c``); anything
        ``numpy.asarray`` accepts is a tensor. The arrays are copied (one memcpy) unless
        ``copy=False``, a promise not to mutate them until the save is committed.
        ``step=None`` takes the next number after the latest. ``metrics`` (``{"loss": 0.3}``)
        are recorded with the checkpoint, in its ``PREFIX.metrics.json`` written before the
        commit, for :class:`~anyckpt.retention.BestN` and :meth:`best_checkpoint`. Raises the
        error of an earlier background save that nobody has seen yet.

        Nested lists, tuples, ``None`` and integer keys are saved under TF-readable names
        (``optimizer/state/0/exp_avg``) with a description of the structure, which
        ``restore(structure=True)`` rebuilds (:mod:`anyckpt.tree`). The save policy may skip
        the save (``pending.skipped``, ``pending.reason``). ``block=False`` raises
        :class:`~anyckpt.save_control.SaveWouldBlockError` instead of waiting for room
        (``max_pending``, ``max_pending_bytes``).
        """
        entered = time.perf_counter()
        self._saves.check_running()
        values = None if metrics is None else check_metrics(metrics)
        if self.coordinator is not None:
            if values is not None:
                raise ValueError("metrics are not recorded by distributed saves yet")
            return await multiprocess.save(
                self, self.coordinator, self._saves, self._control.decide, state, step, copy
            )
        self._saves.raise_unobserved()
        self.checkpoint_dir.check_lock()  # taken over: say so now, not after the write
        step = self._saves.following() if step is None else check_step(step)
        self._saves.check_order(step)
        decision = self._control.decide(step, self._saves.last_saved_step)  # hook: save policies
        if not decision.save:
            return self._saves.skip(step, decision.reason)
        tree = None
        if not self.object_graph and needs_tree(state):
            state, tree = flatten_tree(state)
        if self.object_graph:
            if "save_counter" not in state:  # what TF's manager numbers its checkpoints by
                state = {**state, "save_counter": np.int64(step)}
            state = with_object_graph(state)
        tensors = prepare(state)
        # hook: max_pending_bytes — too big to copy: written while the caller waits, uncopied
        staged = self._control.staged(tensors, copy=copy)
        copy = copy and not staged
        # hook: max_pending_bytes — a slot and the bytes the copy will hold (or block=False)
        ticket = await self._control.admit(self._saves.slots, tensors, copy=copy, block=block)
        try:
            # A save that failed while this one waited for its slot is reported now.
            self._saves.raise_unobserved()
            started = time.perf_counter()
            if copy:
                tensors = await capture(tensors)
            capture_seconds = time.perf_counter() - started
            # hook: save policies / stale check — record the save, digest uncopied arrays (a
            # staged save's need none: the caller waits until they are written)
            await self._control.captured(ticket, step, tensors, copy=copy or staged)
        except BaseException:
            self._saves.slots.release()
            self._control.release(ticket)  # hook: max_pending_bytes
            raise
        name = f"{self.checkpoint_name}-{step}"
        pending = PendingSave(step, self._public(name), reason=decision.reason)
        released = anyio.Event() if staged else None
        self._saves.start(
            pending,
            partial(
                self._write_and_commit,
                pending,
                name,
                tensors,
                capture_seconds,
                values,
                ticket,  # hook: max_pending_bytes / stale check
                tree,  # hook: structures
                entered,
                released,
            ),
        )
        if released is not None:  # staged: the caller's arrays are in use until written
            await released.wait()
        return pending

    async def _write_and_commit(
        self,
        pending: PendingSave,
        name: str,
        tensors: dict[str, np.ndarray],
        capture_seconds: float,
        metrics: dict[str, float] | None,
        ticket: SaveTicket,
        tree: Any,
        entered: float,
        released: anyio.Event | None,
        previous: anyio.Event | None,
    ) -> None:
        """The background part of a save: sidecars, the files, then (in save order) the
        commit. ``released`` (a staged save, not copied) is set once the caller's arrays are
        no longer needed: ``save()`` waits for it."""
        error: BaseException | None = None
        started = time.perf_counter()
        blocked_seconds = started - entered
        try:
            # hook: structures — the sidecar also holds the structure's description
            if metrics is not None or tree is not None:
                # before the commit marker: a committed one has its metrics
                data = encode_metrics(pending.step, metrics or {}, tree)
                sidecar = metrics_path(self._path(name))
                await anyio.to_thread.run_sync(
                    lambda: self.storage.write_bytes(sidecar, data, durable=self.durable)
                )
            if self.write_meta_graph:  # before the commit marker, as part of the checkpoint
                await write_meta_file(
                    self.storage,
                    self._path(name),
                    self.format,
                    tensors,
                    self.format_options,
                    durable=self.durable,
                    max_to_keep=self.policy.max_to_keep,
                    keep_checkpoint_every_n_hours=self.policy.keep_checkpoint_every_n_hours,
                )
            written = await self.format.write(
                self.storage,
                self._path(name),
                tensors,
                durable=self.durable,
                options=self.format_options,
            )
            # hook: stale check — fail before the commit if uncopied arrays changed
            await self._control.written(ticket, pending.step, self._public(name), tensors)
            name = posixpath.basename(checkpoint_path(self.format, self._path(name), written))
            if metrics is not None:
                self.checkpoint_dir.metrics[name] = metrics
            wrote = time.perf_counter()
            nbytes = sum(a.nbytes for a in tensors.values() if a.dtype != object)
            del tensors
            if released is not None:
                blocked_seconds = wrote - entered
                released.set()
            if previous is not None:
                await previous.wait()
            async with self._saves.commit_lock:
                deleted, preserved = await self.checkpoint_dir.commit(name)
            pending.event = SaveEvent(
                pending.step,
                self._public(name),
                nbytes,
                capture_seconds,
                wrote - started,
                time.perf_counter() - wrote,
                deleted,
                preserved,
                blocked_seconds,
                staged=released is not None,
            )
            if self.on_event is not None:
                self.on_event(pending.event)
        except BaseException as exc:
            error = exc
            if self.checkpoint_dir.state.latest != name and not isinstance(
                exc, ConcurrentWriterError
            ):
                # (After a ConcurrentWriterError the directory is someone else's: touch nothing.)
                # Never recorded in the state file: remove what was written (cancelled, or
                # failed after the index was written), so no stray files stay behind.
                await self.checkpoint_dir.discard(name)
            if not isinstance(exc, Exception):
                raise
        finally:
            if released is not None:
                released.set()  # (failed before written: save() returns, the error follows)
            self._saves.slots.release()
            self._control.release(ticket)  # hook: max_pending_bytes
            SaveQueue.finish(pending, error)

    def _checkpoint_of(self, step: int | None) -> str:
        """The name of the checkpoint of ``step`` (the latest committed one when None)."""
        if step is not None:
            return f"{self.checkpoint_name}-{check_step(step)}"
        if self.checkpoint_dir.state.latest is None:
            raise CheckpointNotFoundError("no checkpoint has been committed", path=self.directory)
        return self.checkpoint_dir.state.latest

    async def metrics(self, step: int | None = None) -> dict[str, float]:
        """The metrics recorded with the latest checkpoint (or that of ``step``); empty if
        none were. Raises CorruptCheckpointError for an unreadable sidecar."""
        name = self._checkpoint_of(step)
        await self.checkpoint_dir.load_metrics([name])
        return dict(self.checkpoint_dir.metrics[name])

    async def best_checkpoint(self, metric: str, mode: str = "min") -> str | None:
        """The prefix of the tracked checkpoint (or the latest) with the best ``metric``
        (lowest for ``mode="min"``, highest for ``"max"``; ties go to the newer), or None
        if none recorded it. Saves in flight are waited for first."""
        from ..retention import BestN

        policy = BestN(1, metric, mode)  # type: ignore[arg-type]  # checked by BestN
        await self.wait()
        names = [t.path for t in self.checkpoint_dir.state.tracked]
        if (
            self.checkpoint_dir.state.latest is not None
            and self.checkpoint_dir.state.latest not in names
        ):
            names.append(self.checkpoint_dir.state.latest)
        await self.checkpoint_dir.load_metrics(names)
        candidates = [
            Candidate(n, 0.0, self._step_of(n), self.checkpoint_dir.metrics[n]) for n in names
        ]
        best = policy.ranked(candidates)
        return self._public(best[0].path) if best else None

    async def _rebuild(self, name: str, flat: dict[str, np.ndarray]) -> Any:
        """hook: structures — ``flat`` in the structure the sidecar of ``name`` describes."""
        from ..codecs.metrics import decode_tree

        path = metrics_path(self._path(name))
        try:
            data = await anyio.to_thread.run_sync(
                lambda: self.storage.read_bytes(path, max_size=MAX_METRICS_SIZE)
            )
            tree = decode_tree(data)
        except CheckpointNotFoundError:
            tree = None
        except DecodeError as exc:
            raise CorruptCheckpointError(str(exc), path=self.storage.url(path)) from None
        if tree is None:
            return nest_names(flat)
        return rebuild(tree, flat, self.storage.url(path))

    async def wait(self) -> None:
        """Wait until every save so far is committed; raise the first unseen error."""
        await self._saves.wait()

    async def sweep(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Apply the retention policy now, without saving: delete what it drops from the
        tracked checkpoints, then record the result in the state file, as after a save.
        Returns the prefixes deleted and preserved. ``anyckpt prune`` runs this."""
        self._saves.check_running()
        if self.coordinator is not None:
            return await multiprocess.sweep(self, self.coordinator, self._saves)
        async with self._saves.commit_lock:
            return await self.checkpoint_dir.sweep()

    # -- restoring ---------------------------------------------------------------------------

    @overload
    async def restore(
        self,
        step: int | None = None,
        keys: Sequence[str] | Mapping[str, Index] | None = None,
        *,
        verify: bool = True,
        structure: Literal[False] = False,
    ) -> dict[str, np.ndarray]: ...

    @overload
    async def restore(
        self,
        step: int | None = None,
        keys: Sequence[str] | Mapping[str, Index] | None = None,
        *,
        verify: bool = True,
        structure: Literal[True],
    ) -> Any: ...

    @overload
    async def restore(
        self,
        step: int | None = None,
        keys: Sequence[str] | Mapping[str, Index] | None = None,
        *,
        verify: bool = True,
        template: _T,
    ) -> _T: ...

    async def restore(
        self,
        step: int | None = None,
        keys: Sequence[str] | Mapping[str, Index] | None = None,
        *,
        verify: bool = True,
        template: Any = None,
        structure: bool = False,
    ) -> Any:
        """Read the latest checkpoint (or the one of ``step``): a flat mapping of names to
        arrays (nested state comes back under its flattened ``a/b/c`` names). With
        ``template`` (a fresh model's and optimizer's state, nested dicts, lists, tuples,
        int keys...), the template's structure filled with the restored values, each leaf's
        dtype and shape checked (:func:`anyckpt.tree.restore_into`).

        ``keys`` names the tensors to read (all when None). A mapping ``{name: index}`` reads
        only part of each (``index`` as for :meth:`CheckpointReader.read`, over the leading
        axes; None for all of it): only those bytes are read, as each rank of a distributed
        job restores its own share (docs/distributed.md).

        Saves still in flight are waited for first (and their errors raised), so a restore
        right after ``save()`` sees that save, as with TensorFlow's synchronous Saver.

        ``structure=True`` returns the structure ``save()`` was given (lists, tuples, ``None``,
        integer keys, PyTorch tensors as CPU tensors), from the description it recorded;
        for a checkpoint without one, the ``a/b/c`` names as nested dicts."""
        if structure:  # hook: structures
            if template is not None or keys is not None:
                raise ValueError("restore(structure=True) takes neither template nor keys")
            flat = await self.restore(step, verify=verify)
            return await self._rebuild(self._checkpoint_of(step), flat)
        if template is not None:
            flat = await self.restore(step, keys, verify=verify)
            return restore_into(template, flat)
        await self.wait()
        prefix = self._path(self._checkpoint_of(step))
        fmt = await self.checkpoint_dir.format_of(prefix, missing_ok=False)
        reader = await fmt.open(self.storage, prefix)
        try:
            if not isinstance(keys, Mapping):
                return await reader.read_many(keys, verify=verify)
            # V2 batches the pieces' ranges; by default one read per piece, concurrently.
            return await read_slices(reader, keys, verify=verify)
        finally:
            await reader.aclose()
