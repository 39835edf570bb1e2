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
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import anyio.abc
import anyio.to_thread
import numpy as np

from .._concurrency import run_concurrently
from ..api import meta_path, with_object_graph, write_meta_file
from ..codecs import DecodeError
from ..codecs.metrics import (
    MAX_METRICS_SIZE,
    METRICS_SUFFIX,
    check_metrics,
    decode_metrics,
    encode_metrics,
    metrics_path,
)
from ..codecs.state_file import (
    CheckpointState,
    encode_state,
    relativize,
)
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriterError,
    CorruptCheckpointError,
)
from ..formats import detect_format, get_format
from ..formats.base import CheckpointFormat, Index, check_options
from ..formats.layout import NameIndex
from ..lease import DirectoryLock
from ..meta import saver_version
from ..retention import (
    Candidate,
    KeepFor,
    Plan,
    Policy,
    RetentionDecision,
    RetentionPolicy,
    Tracked,
    decide,
    record_save,
    recover,
    start_fresh,
    tf_policy,
)
from ..save_control import SaveControl  # hook: save policies (issue 16)
from ..storage import TEMP_MARKER, Storage
from ..tensors import prepare
from . import distributed as multiprocess
from .capture import capture
from .pending import PendingSave, SaveEvent
from .state import STATE_FILE, read_state, read_state_versioned
from .steps import check_step

if TYPE_CHECKING:
    from ..distributed import Coordinator

_T = TypeVar("_T")


@dataclass
class Tracking:
    tracked: list[Tracked] = field(default_factory=list)
    last_preserved: float = 0.0
    latest: str | None = None  # relative name of the latest committed checkpoint


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
        self.format: CheckpointFormat = get_format(format)
        self.max_pending = max_pending
        self.checkpoint_interval = checkpoint_interval
        self.durable = durable
        self.clock = clock
        self.on_event = on_event
        self.format_options = dict(format_options or {})
        check_options(self.format, self.format_options)
        if write_meta_graph:
            saver_version(self.format)  # only formats TensorFlow's Saver writes get a .meta
        self.write_meta_graph = write_meta_graph
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
        self._storage: Storage | None = None
        self._root_path = ""
        self._storage_options = storage_options
        self._allow_symlinks = allow_symlinks
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be positive")
        self.lease_seconds = float(lease_seconds)
        self._lock: DirectoryLock | None = None
        self._state_version: str | None = None  # of the state file, as last read or written
        # A recorded name is ``{checkpoint_name}-{step}``, or a format's pattern of it (V1
        # sharded: ``ckpt-5-?????-of-00002``).
        self._step_re = re.compile(re.escape(checkpoint_name) + r"-(\d+)(-\?{5}-of-\d{5})?")
        self._state = Tracking()
        self._slots = anyio.Semaphore(max_pending)
        self._commit_lock = anyio.Lock()
        self._pending: list[PendingSave] = []
        self._last_step: int | None = None
        self._last_saved_step: int | None = None
        self._tail: anyio.Event | None = None  # done-event of the newest save: commits go in order
        self._task_group: anyio.abc.TaskGroup | None = None
        self._entered = False
        self._metrics: dict[str, dict[str, float]] = {}  # by checkpoint name, as read/written

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        """The directory's storage (opened on entering the manager, or here on first use)."""
        if self._storage is None:
            self._set_storage(self._open_storage())
        assert self._storage is not None
        return self._storage

    @property
    def _root(self) -> str:
        self.storage  # noqa: B018 (opens it)
        return self._root_path

    def _open_storage(self) -> tuple[Storage, str]:
        return Storage.from_url(
            self.directory, self._storage_options, allow_symlinks=self._allow_symlinks
        )

    def _set_storage(self, opened: tuple[Storage, str]) -> None:
        if self._storage is None:
            self._storage, self._root_path = opened

    async def __aenter__(self) -> CheckpointManager:
        if self._entered:
            raise RuntimeError("a CheckpointManager can be entered once")
        self._entered = True
        self._control.enter()  # hook: preemption — signal handlers (main thread)
        try:
            if self._storage is None:
                self._set_storage(await anyio.to_thread.run_sync(self._open_storage))
            if self.coordinator is None:
                await self._open_directory()
            else:
                await multiprocess.enter(self, self.coordinator, self._open_directory)
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
        except BaseException:
            await self._release_lock()
            self._control.exit()  # hook: preemption — previous handlers back
            raise
        return self

    async def _open_directory(self) -> None:
        """Read the state file and remove what interrupted saves left (with a coordinator:
        on rank 0, the others adopt its view)."""
        # The lock first: reading the state and cleaning debris must not race another writer.
        lock = DirectoryLock(self.storage, self._root, lease_seconds=self.lease_seconds)
        await anyio.to_thread.run_sync(lock.acquire)
        self._lock = lock
        await self._load_state()
        # The state file is replaced by a rename: a link or anything else planted at its name
        # is refused now, before anything is written.
        await anyio.to_thread.run_sync(self.storage.check_replaceable, self._path(STATE_FILE))
        await self._clean_debris()
        if self.retention is not None and self.retention.metric_names:
            await self._load_metrics([t.path for t in self._state.tracked])

    async def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lock.release)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task_group is not None
        if exc is not None and not isinstance(exc, Exception):
            # Cancelled or interrupted: stop writing (nothing half-written stays). After an
            # ordinary error in the training loop, captured saves still finish and commit.
            self._task_group.cancel_scope.cancel()
        try:
            # The body's exception is not the task group's business: handed to it, the task
            # group would cancel the captured saves and wrap the exception in an
            # ExceptionGroup. The body's exception propagates unchanged when we return.
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            await self._release_lock()
            self._control.exit()  # hook: preemption — previous handlers back
        if exc is None:
            self._raise_unobserved()
        elif isinstance(exc, Exception):
            self._note_unobserved(exc)

    def _note_unobserved(self, exc: Exception) -> None:
        """The body failed and its exception propagates: it also names the saves that failed
        unseen, so their errors are not swallowed (as notes, on Python 3.11+)."""
        for pending in self._pending:
            if pending.done() and pending._error is not None and not pending._observed:
                pending._observed = True
                if hasattr(exc, "add_note"):
                    error, step = pending._error, pending.step
                    exc.add_note(f"the background save of step {step} failed too: {error!r}")

    def _raise_unobserved(self) -> None:
        for pending in self._pending:
            if pending.done() and pending._error is not None and not pending._observed:
                pending._observed = True
                raise pending._error
        self._pending = [p for p in self._pending if not p.done()]

    # -- state -------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return posixpath.join(self._root, name)

    def _public(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def _step_of(self, name: str) -> int | None:
        match = self._step_re.fullmatch(name)
        return int(match.group(1)) if match else None

    async def _load_state(self) -> None:
        state, self._state_version = await read_state_versioned(self.storage, self._root)
        now = self.clock()
        if state is None:
            recovered = start_fresh(now)
            latest = None
        else:
            paths = [relativize(p, self._root) for p in state.all_model_checkpoint_paths]
            recovered = recover(
                paths, state.all_model_checkpoint_timestamps, state.last_preserved_timestamp, now
            )
            latest = (
                relativize(state.model_checkpoint_path, self._root)
                if state.model_checkpoint_path
                else None
            )
        self._state = Tracking(list(recovered.tracked), recovered.last_preserved_timestamp, latest)
        steps = [
            s
            for s in (
                self._step_of(n)
                for n in [*(t.path for t in recovered.tracked), *([latest] if latest else [])]
            )
            if s is not None
        ]
        self._last_step = max(steps, default=None)
        self._last_saved_step = self._last_step

    def _state_file(self) -> CheckpointState:
        tracked = self._state.tracked
        return CheckpointState(
            model_checkpoint_path=self._state.latest or "",
            all_model_checkpoint_paths=tuple(t.path for t in tracked),
            all_model_checkpoint_timestamps=tuple(t.timestamp for t in tracked),
            last_preserved_timestamp=self._state.last_preserved,
        )

    async def _clean_debris(self) -> None:
        """Remove what interrupted saves of this manager's naming left behind: temporary
        files, data files without their index, and complete checkpoints newer than the
        latest committed one (written, but never recorded in the state file)."""
        names = await anyio.to_thread.run_sync(self.storage.listdir, self._root)
        latest_step = self._step_of(self._state.latest) if self._state.latest else None
        tracked_paths = {t.path for t in self._state.tracked}  # one lookup per file, not a scan
        ours = re.compile(
            re.escape(self.checkpoint_name)
            + r"-(\d+)(\.index|\.data-\d{5}-of-\d{5}|\.meta|"
            + re.escape(METRICS_SUFFIX)
            + ")"
        )
        # Temporary files of any format's writer for one of our checkpoints (V1 shards
        # ``ckpt-5-00000-of-00002``, plugin files ``ckpt-5.zst``...).
        any_format = re.compile(re.escape(self.checkpoint_name) + r"-\d+([.-][\w.-]*)?")
        present = set(names)
        shard = re.compile(r"(\.index|\.data-\d{5}-of-\d{5}|-\d{5}-of-\d{5})$")
        stems = {  # any format
            shard.sub("", n) for n in names if not n.endswith((".meta", METRICS_SUFFIX))
        }
        doomed: list[str] = []
        for name in names:
            if TEMP_MARKER in name:
                base = name.split(TEMP_MARKER, 1)[0]
                if base == STATE_FILE or ours.fullmatch(base) or any_format.fullmatch(base):
                    doomed.append(name)
                continue
            match = ours.fullmatch(name)
            if not match:
                continue
            step = int(match.group(1))
            prefix = f"{self.checkpoint_name}-{step}"
            if self._state.latest == prefix:
                continue
            tracked = prefix in tracked_paths
            # Newer than the latest commit: written but never recorded. Without a state file
            # we cannot tell, so only files without their index (never complete) go: those
            # of an interrupted save, or of a tracked checkpoint whose deletion was
            # interrupted (it stays tracked; the next sweep finishes it).
            newer = latest_step is not None and step > latest_step and not tracked
            if match.group(2) in (".meta", METRICS_SUFFIX):  # stay while the checkpoint has files
                if newer or prefix not in stems:
                    doomed.append(name)
            elif newer or f"{prefix}.index" not in present:
                doomed.append(name)
        doomed.sort(key=lambda n: not n.endswith(".index"))  # commit markers first
        for name in doomed:
            await anyio.to_thread.run_sync(self.storage.remove, self._path(name))
        # On S3, a save killed mid-upload leaves an unfinished multipart upload (its parts
        # billed, invisible to listings). Under the lock no save of ours is in flight, so
        # every upload of one of our names (the state file, any format's checkpoint files,
        # their temporary names) belongs to an interrupted save: abort it.
        for upload in await anyio.to_thread.run_sync(self.storage.list_uploads, self._root):
            base = posixpath.basename(upload.path).split(TEMP_MARKER, 1)[0]
            if base == STATE_FILE or ours.fullmatch(base) or any_format.fullmatch(base):
                await anyio.to_thread.run_sync(self.storage.abort_upload, upload)

    # -- public view -------------------------------------------------------------------------

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint's prefix (``DIR/ckpt-STEP``), or None."""
        return self._public(self._state.latest) if self._state.latest else None

    @property
    def checkpoints(self) -> list[str]:
        """Prefixes of the committed checkpoints retention tracks, oldest first. A save still
        being written is not among them until it commits: ``await wait()`` first to see it."""
        return [self._public(t.path) for t in self._state.tracked]

    @property
    def latest_step(self) -> int | None:
        return self._step_of(self._state.latest) if self._state.latest else None

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
        if self._task_group is None:
            raise RuntimeError("use the manager inside 'async with'")
        values = None if metrics is None else check_metrics(metrics)
        if self.coordinator is not None:
            if values is not None:
                raise ValueError("metrics are not recorded by distributed saves yet")
            return await multiprocess.save(self, self.coordinator, state, step, copy)
        self._raise_unobserved()
        if self._lock is not None:
            self._lock.check()  # the directory was taken over: say so now, not after the write
        if step is None:
            step = 1 if self._last_step is None else self._last_step + 1
        step = check_step(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} is not after the last step {self._last_step}")
        decision = self._control.decide(step, self._last_saved_step)  # hook: save policies
        if not decision.save:
            self._last_step = step
            return PendingSave(step, None, skipped=True, reason=decision.reason)
        from ..tree import flatten_tree, needs_tree  # hook: structures

        tree = None
        if not self.object_graph and needs_tree(state):
            state, tree = flatten_tree(state)
        if self.object_graph:
            if "save_counter" not in state:  # what TF's manager numbers its checkpoints by
                state = {**state, "save_counter": np.int64(step)}
            state = with_object_graph(state)
        tensors = prepare(state)
        # hook: max_pending_bytes — a slot and the bytes the copy will hold (or block=False)
        ticket = await self._control.admit(self._slots, tensors, copy=copy, block=block)
        try:
            # A save that failed while this one waited for its slot is reported now.
            self._raise_unobserved()
            started = time.perf_counter()
            if copy:
                tensors = await capture(tensors)
            capture_seconds = time.perf_counter() - started
            # hook: save policies / stale check — record the save, digest uncopied arrays
            await self._control.captured(ticket, step, tensors, copy=copy)
        except BaseException:
            self._slots.release()
            self._control.release(ticket)  # hook: max_pending_bytes
            raise
        name = f"{self.checkpoint_name}-{step}"
        pending = PendingSave(step, self._public(name), reason=decision.reason)
        pending._ticket, pending._tree = ticket, tree  # hook: save policies / structures
        self._last_step = self._last_saved_step = step
        self._pending.append(pending)
        previous, self._tail = self._tail, pending._done
        self._task_group.start_soon(
            self._write_and_commit, pending, previous, name, tensors, capture_seconds, values
        )
        return pending

    async def _write_and_commit(
        self,
        pending: PendingSave,
        previous: anyio.Event | None,
        name: str,
        tensors: dict[str, np.ndarray],
        capture_seconds: float,
        metrics: dict[str, float] | None = None,
    ) -> None:
        error: BaseException | None = None
        try:
            started = time.perf_counter()
            # hook: structures — the sidecar also holds the structure's description
            if metrics is not None or pending._tree is not None:
                # before the commit marker: a committed one has its metrics
                data = encode_metrics(pending.step, metrics or {}, pending._tree)
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
            await self._control.written(pending._ticket, pending.step, self._public(name), tensors)
            recorded = getattr(self.format, "checkpoint_path", None)
            if recorded is not None:
                name = posixpath.basename(recorded(self._path(name), written))
            if metrics is not None:
                self._metrics[name] = metrics
            wrote = time.perf_counter()
            nbytes = sum(a.nbytes for a in tensors.values() if a.dtype != object)
            del tensors
            if previous is not None:
                await previous.wait()
            async with self._commit_lock:
                deleted, preserved = await self._commit(name)
            pending.event = SaveEvent(
                pending.step,
                self._public(name),
                nbytes,
                capture_seconds,
                wrote - started,
                time.perf_counter() - wrote,
                deleted,
                preserved,
            )
            if self.on_event is not None:
                self.on_event(pending.event)
        except BaseException as exc:
            error = exc
            if self._state.latest != name and not isinstance(exc, ConcurrentWriterError):
                # (After a ConcurrentWriterError the directory is someone else's: touch nothing.)
                # Never recorded in the state file: remove what was written (cancelled, or
                # failed after the index was written), so no stray files stay behind.
                await self._discard_uncommitted(name)
            if not isinstance(exc, Exception):
                pending._finish(CheckpointError(f"save of step {pending.step} was cancelled"))
                pending._observed = True
                raise
        finally:
            self._slots.release()
            self._control.release(pending._ticket)  # hook: max_pending_bytes
            if not pending.done():
                pending._finish(error)

    async def _commit(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Record ``name`` in the state file, then delete what retention dropped.

        As TensorFlow does, the state file is written first with the new checkpoint added and
        nothing removed (the commit), and once more after the deletions. So a crash or a failed
        delete in between leaves the dropped checkpoints tracked, and the next sweep (of this
        manager or the next one) deletes them; they never become untracked leftovers, which
        would look like preserved checkpoints and stay forever.
        """
        now = self.clock()
        tracked = record_save(self._state.tracked, name, now)
        decision = self._decide(tracked, self._state.last_preserved, name, now).decision
        await self._write_tracking(Tracking(tracked, self._state.last_preserved, name))
        if not decision.delete and not decision.preserve:
            return (), ()
        return await self._drop(decision, name)

    async def _drop(
        self, decision: RetentionDecision, latest: str | None
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The second half of the commit sequence, shared by a save's commit and a sweep:
        delete what retention dropped, then record what it kept in the state file."""
        deleted = await self._delete_checkpoints([c.path for c in decision.delete])
        keep, stamp = list(decision.keep), decision.last_preserved_timestamp
        await self._write_tracking(Tracking(keep, stamp, latest))
        return tuple(deleted), tuple(self._public(c.path) for c in decision.preserve)

    async def _write_tracking(self, new_state: Tracking) -> None:
        """Make ``new_state`` the manager's state, on disk first."""
        old_state, self._state = self._state, new_state
        version = self._state_version
        try:
            await self._store_state()
        except BaseException:
            # Failed before the state file was replaced: the old state stands. Failed after
            # (syncing the directory): readers already see the new one, and so does the manager.
            if self._state_version == version:
                self._state = old_state
            raise

    async def _store_state(self) -> None:
        """Write the state file from ``self._state``: only while the lock is ours, and only
        over the version this manager last read or wrote (compare-and-swap)."""
        data = encode_state(self._state_file())
        path = self._path(STATE_FILE)
        lock = self._lock
        if lock is None:
            raise RuntimeError("use the manager inside 'async with'")

        def write() -> str:
            lock.confirm()
            try:
                return self.storage.replace_if(
                    path, data, self._state_version, durable=self.durable
                )
            except ConcurrentWriterError:
                raise ConcurrentWriterError(
                    "the state file was changed by another writer since this manager read or "
                    "wrote it; not overwriting it",
                    path=self.storage.url(path),
                ) from None

        await anyio.to_thread.run_sync(self.storage.makedirs, self._root)
        self._state_version = await anyio.to_thread.run_sync(write)
        if self.durable:
            await anyio.to_thread.run_sync(self.storage.sync_directory, self._root)

    async def _discard_uncommitted(self, name: str) -> None:
        """Best effort: delete the files of a save that never committed. Skipped if the state
        file names it after all (a state write that failed after replacing the file); what
        is left here, the next manager's start-up cleanup removes."""
        with anyio.CancelScope(shield=True):
            try:
                state = await read_state(self.storage, self._root)
                if state is not None and any(
                    posixpath.basename(p) == name
                    for p in (state.model_checkpoint_path, *state.all_model_checkpoint_paths)
                ):
                    return
                await self._delete_checkpoint(name)
            except Exception:
                pass

    async def _delete_checkpoints(self, names: list[str]) -> list[str]:
        """Delete checkpoints retention dropped, oldest first; return their public prefixes.

        One is deleted as it is found. Several (the first sweep of a long state file, a
        lower ``max_to_keep``) are checked against one listing of the directory first: one
        with no file on disk costs a lookup in that listing, not a format detection (which
        may list the directory again), so the sweep stays linear in the directory's size."""
        on_disk = None
        if len(names) > 1:
            on_disk = NameIndex(await anyio.to_thread.run_sync(self.storage.listdir, self._root))
        for name in names:
            if on_disk is None or on_disk.may_hold(name):
                await self._delete_checkpoint(name)
        return [self._public(name) for name in names]

    async def _delete_checkpoint(self, name: str) -> None:
        prefix = self._path(name)
        fmt = await self._format_of(prefix)
        files = await fmt.files(self.storage, prefix)
        for path in reversed(files):  # the commit marker (last written) goes first
            if posixpath.dirname(path) != self._root:
                raise CheckpointError(f"format listed {path} outside the directory")
            await anyio.to_thread.run_sync(self.storage.remove, path)
        await anyio.to_thread.run_sync(self.storage.remove, meta_path(prefix))  # after the data
        await anyio.to_thread.run_sync(self.storage.remove, metrics_path(prefix))
        self._metrics.pop(name, None)

    def _decide(
        self,
        tracked: Sequence[Tracked],
        last_preserved: float,
        latest: str | None,
        now: float | None = None,
        *,
        explain: bool = False,
    ) -> Plan:
        """What retention does to ``tracked`` (pure: :func:`anyckpt.retention.decide`)."""
        candidates = [
            Candidate(t.path, t.timestamp, self._step_of(t.path), self._metrics.get(t.path, {}))
            for t in tracked
        ]
        if now is None:  # read the clock only for a policy that needs it (as TF's sweep)
            needs = self.retention is not None and any(
                isinstance(p, KeepFor) for p in self.retention.parts()
            )
            now = self.clock() if needs else 0.0
        return decide(
            candidates, last_preserved, self.retention, now=now, latest=latest, explain=explain
        )

    async def _load_metrics(self, names: Sequence[str]) -> None:
        """Read the metrics sidecars of ``names`` not read yet (a missing one: no metrics)."""

        def read(name: str) -> dict[str, float]:
            path = metrics_path(self._path(name))
            try:
                data = self.storage.read_bytes(path, max_size=MAX_METRICS_SIZE)
            except CheckpointNotFoundError:
                return {}
            try:
                return decode_metrics(data)
            except DecodeError as exc:
                raise CorruptCheckpointError(str(exc), path=self.storage.url(path)) from None

        for name in names:
            if name not in self._metrics:
                self._metrics[name] = await anyio.to_thread.run_sync(read, name)

    def _checkpoint_of(self, step: int | None) -> str:
        """The name of the checkpoint of ``step`` (the latest committed one when None)."""
        if step is not None:
            return f"{self.checkpoint_name}-{check_step(step)}"
        if self._state.latest is None:
            raise CheckpointNotFoundError("no checkpoint has been committed", path=self.directory)
        return self._state.latest

    async def metrics(self, step: int | None = None) -> dict[str, float]:
        """The metrics recorded with the latest checkpoint (or that of ``step``); empty if
        none were. Raises CorruptCheckpointError for an unreadable sidecar."""
        name = self._checkpoint_of(step)
        await self._load_metrics([name])
        return dict(self._metrics[name])

    async def best_checkpoint(self, metric: str, mode: str = "min") -> str | None:
        """The prefix of the tracked checkpoint (or the latest) with the best ``metric``
        (lowest for ``mode="min"``, highest for ``"max"``; ties go to the newer), or None
        if none recorded it. Saves in flight are waited for first."""
        from ..retention import BestN

        policy = BestN(1, metric, mode)  # type: ignore[arg-type]  # checked by BestN
        await self.wait()
        names = [t.path for t in self._state.tracked]
        if self._state.latest is not None and self._state.latest not in names:
            names.append(self._state.latest)
        await self._load_metrics(names)
        candidates = [Candidate(n, 0.0, self._step_of(n), self._metrics[n]) for n in names]
        best = policy.ranked(candidates)
        return self._public(best[0].path) if best else None

    async def _rebuild(self, name: str, flat: dict[str, np.ndarray]) -> Any:
        """hook: structures — ``flat`` in the structure the sidecar of ``name`` describes."""
        from ..codecs.metrics import decode_tree
        from ..tree import nest_names, rebuild

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

    async def _format_of(self, prefix: str, *, missing_ok: bool = True) -> CheckpointFormat:
        """The format of the checkpoint at ``prefix``: this manager's own format first, so
        its retention and restores never depend on other formats (plugins) loading."""
        if await self.format.detect(self.storage, prefix):
            return self.format
        try:
            return await detect_format(self.storage, prefix)
        except CheckpointNotFoundError:
            if not missing_ok:
                raise
            return self.format

    async def wait(self) -> None:
        """Wait until every save so far is committed; raise the first unseen error."""
        for pending in list(self._pending):
            await pending._done.wait()
        self._raise_unobserved()

    async def sweep(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Apply the retention policy now, without saving: delete what it drops from the
        tracked checkpoints, then record the result in the state file, as after a save.
        Returns the prefixes deleted and preserved. ``anyckpt prune`` runs this."""
        if self._task_group is None:
            raise RuntimeError("use the manager inside 'async with'")
        if self.coordinator is not None:
            return await multiprocess.sweep(self, self.coordinator)
        async with self._commit_lock:
            return await self.sweep_locked()

    async def sweep_locked(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """:meth:`sweep`'s work, for a caller already holding the commit lock (the primary
        rank of a distributed sweep): the one place a sweep's sequence is written."""
        state = self._state
        decision = self._decide(state.tracked, state.last_preserved, state.latest).decision
        if not decision.delete and not decision.preserve:
            return (), ()
        return await self._drop(decision, state.latest)

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
            from ..tree import restore_into

            flat = await self.restore(step, keys, verify=verify)
            return restore_into(template, flat)
        await self.wait()
        prefix = self._path(self._checkpoint_of(step))
        fmt = await self._format_of(prefix, missing_ok=False)
        reader = await fmt.open(self.storage, prefix)
        try:
            if not isinstance(keys, Mapping):
                return await reader.read_many(keys, verify=verify)
            read_slices = getattr(reader, "read_slices", None)
            if read_slices is not None:  # the pieces' ranges batched (V2Reader.read_slices)
                pieces: dict[str, np.ndarray] = await read_slices(keys, verify=verify)
                return pieces
            out: dict[str, np.ndarray] = {}

            async def read(key: str, index: Index) -> None:
                out[key] = await reader.read(key, index, verify=verify)

            # The first error as itself (as reader.read raises it), not an exception group.
            await run_concurrently(partial(read, key, index) for key, index in keys.items())
            return {key: out[key] for key in keys}
        finally:
            await reader.aclose()
