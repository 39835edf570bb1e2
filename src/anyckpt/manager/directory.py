"""The :class:`CheckpointDirectory`: one writer's view of a checkpoint directory.

It holds the directory's lock, the tracking the state file records (latest and retained
checkpoints), and the commit sequence, written once here: record -> write state -> delete ->
write state (see docs/commit-protocol.md). The state file is written only while the lock is
ours and only over the version last read or written (compare-and-swap). The pure retention
decision stays in :mod:`anyckpt.retention`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.to_thread

from ..codecs import DecodeError
from ..codecs.metrics import MAX_METRICS_SIZE, decode_metrics
from ..codecs.state_file import (
    MAX_STATE_FILE_SIZE,
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
from ..formats import detect_format
from ..formats.base import CheckpointFormat
from ..formats.layout import (
    NameIndex,
    debris,
    final_name,
    is_managed,
    meta_path,
    metrics_path,
    split_step,
)
from ..lease import DirectoryLock
from ..retention import (
    Candidate,
    KeepFor,
    Plan,
    Policy,
    RetentionDecision,
    Tracked,
    decide,
    record_save,
    recover,
    start_fresh,
)
from ..storage import Storage
from .state import STATE_FILE, read_state, read_state_versioned

Deletions = tuple[tuple[str, ...], tuple[str, ...]]  # prefixes deleted, preserved


@dataclass
class Tracking:
    """What the state file records: the retained checkpoints and the latest one."""

    tracked: list[Tracked] = field(default_factory=list)
    last_preserved: float = 0.0
    latest: str | None = None  # relative name of the latest committed checkpoint


class Settings(Protocol):
    """What a directory reads from its owner (the manager's public settings, read live)."""

    directory: str
    checkpoint_name: str
    format: CheckpointFormat
    durable: bool
    retention: Policy | None
    clock: Callable[[], float]
    lease_seconds: float


class CheckpointDirectory:
    """The lock, tracking, state file and commit sequence of one checkpoint directory."""

    def __init__(
        self,
        settings: Settings,
        storage_options: dict[str, Any] | None = None,
        *,
        allow_symlinks: bool = False,
    ) -> None:
        self.settings = settings
        self._storage: Storage | None = None
        self._root_path = ""
        self._storage_options = storage_options
        self._allow_symlinks = allow_symlinks
        self._lock: DirectoryLock | None = None
        self._version: str | None = None  # of the state file, as last read or written
        self.state = Tracking()
        self.metrics: dict[str, dict[str, float]] = {}  # by checkpoint name, as read/written

    # -- storage and names -------------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        """The directory's storage (opened on first use unless :meth:`open_storage` ran)."""
        if self._storage is None:
            self._set_storage(self._connect())
        assert self._storage is not None
        return self._storage

    @property
    def root(self) -> str:
        """The directory's path inside :attr:`storage`."""
        self.storage  # noqa: B018 (opens it)
        return self._root_path

    def _connect(self) -> tuple[Storage, str]:
        return Storage.from_url(
            self.settings.directory, self._storage_options, allow_symlinks=self._allow_symlinks
        )

    def _set_storage(self, opened: tuple[Storage, str]) -> None:
        if self._storage is None:
            self._storage, self._root_path = opened

    async def open_storage(self) -> None:
        """Open the storage in a worker thread (the first s3:// imports s3fs, ~0.2 s)."""
        if self._storage is None:
            self._set_storage(await anyio.to_thread.run_sync(self._connect))

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def public(self, name: str) -> str:
        return f"{self.settings.directory}/{name}"

    def step_of(self, name: str) -> int | None:
        """The step of a recorded name (``ckpt-5``, V1 sharded ``ckpt-5-?????-of-00002``)."""
        return split_step(name, self.settings.checkpoint_name)

    @property
    def last_step(self) -> int | None:
        """The highest step among the tracked and the latest checkpoint."""
        latest = self.state.latest
        names = [*(t.path for t in self.state.tracked), *([latest] if latest else [])]
        return max((s for s in map(self.step_of, names) if s is not None), default=None)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the lock, read the state file and remove what interrupted saves left."""
        # The lock first: reading the state and cleaning debris must not race another writer.
        lock = DirectoryLock(self.storage, self.root, lease_seconds=self.settings.lease_seconds)
        await anyio.to_thread.run_sync(lock.acquire)
        self._lock = lock
        await self.load()
        # The state file is replaced by a rename: a link or anything else planted at its name
        # is refused now, before anything is written.
        await anyio.to_thread.run_sync(self.storage.check_replaceable, self.path(STATE_FILE))
        await self.clean_debris()
        retention = self.settings.retention
        if retention is not None and retention.metric_names:
            await self.load_metrics([t.path for t in self.state.tracked])

    async def close(self) -> None:
        """Release the lock (if held)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lock.release)

    def check_lock(self) -> None:
        """Raise if the lock, once held, was taken over (a no-op without a lock)."""
        if self._lock is not None:
            self._lock.check()

    def adopt(self, state: Tracking) -> None:
        """Take ``state`` as this directory's tracking (a distributed follower)."""
        self.state = state

    async def load(self) -> None:
        """Read the state file into :attr:`state`."""
        storage, root = self.storage, self.root
        state, self._version = await read_state_versioned(storage, root)
        now = self.settings.clock()
        if state is None:
            recovered = start_fresh(now)
            latest = None
        else:
            paths = [relativize(p, root) for p in state.all_model_checkpoint_paths]
            recovered = recover(
                paths, state.all_model_checkpoint_timestamps, state.last_preserved_timestamp, now
            )
            latest = (
                relativize(state.model_checkpoint_path, root)
                if state.model_checkpoint_path
                else None
            )
        self.state = Tracking(list(recovered.tracked), recovered.last_preserved_timestamp, latest)

    async def clean_debris(self) -> None:
        """Remove what interrupted saves of this manager's naming left behind: temporary
        files, data files without their index, and complete checkpoints newer than the
        latest committed one (written, but never recorded in the state file)."""
        checkpoint_name = self.settings.checkpoint_name
        names = await anyio.to_thread.run_sync(self.storage.listdir, self.root)
        tracked_paths = {t.path for t in self.state.tracked}  # one lookup per file, not a scan
        doomed = debris(  # the rule anyckpt prune shows, in one place (formats.layout)
            names, tracked_paths, checkpoint_name=checkpoint_name, latest=self.state.latest
        )
        for name in doomed:
            await anyio.to_thread.run_sync(self.storage.remove, self.path(name))
        # On S3, a save killed mid-upload leaves an unfinished multipart upload (its parts
        # billed, invisible to listings). Under the lock no save of ours is in flight, so
        # every upload of one of our names (the state file, any format's checkpoint files,
        # their temporary names) belongs to an interrupted save: abort it.
        for upload in await anyio.to_thread.run_sync(self.storage.list_uploads, self.root):
            base = final_name(posixpath.basename(upload.path))
            if is_managed(base, checkpoint_name):
                await anyio.to_thread.run_sync(self.storage.abort_upload, upload)

    # -- the commit sequence -----------------------------------------------------------------

    async def commit(self, name: str) -> Deletions:
        """Record ``name`` in the state file, then delete what retention dropped.

        As TensorFlow does, the state file is written first with the new checkpoint added and
        nothing removed (the commit), and once more after the deletions. So a crash or a failed
        delete in between leaves the dropped checkpoints tracked, and the next sweep (of this
        manager or the next one) deletes them; they never become untracked leftovers, which
        would look like preserved checkpoints and stay forever.
        """
        now = self.settings.clock()
        tracked = record_save(self.state.tracked, name, now)
        decision = self.decide(tracked, self.state.last_preserved, name, now).decision
        await self._write_tracking(Tracking(tracked, self.state.last_preserved, name))
        return await self._drop(decision, name)

    async def sweep(self) -> Deletions:
        """Apply retention without saving: delete what it drops, then record the result.
        The caller holds the manager's commit lock."""
        state = self.state
        decision = self.decide(state.tracked, state.last_preserved, state.latest).decision
        return await self._drop(decision, state.latest)

    async def _drop(self, decision: RetentionDecision, latest: str | None) -> Deletions:
        """The second half of the commit sequence, shared by a commit and a sweep: delete
        what retention dropped, then record what it kept in the state file."""
        if not decision.delete and not decision.preserve:
            return (), ()
        deleted = await self._delete_checkpoints([c.path for c in decision.delete])
        keep, stamp = list(decision.keep), decision.last_preserved_timestamp
        await self._write_tracking(Tracking(keep, stamp, latest))
        return tuple(deleted), tuple(self.public(c.path) for c in decision.preserve)

    async def _write_tracking(self, new_state: Tracking) -> None:
        """Make ``new_state`` the directory's state, on disk first."""
        old_state, self.state = self.state, new_state
        version = self._version
        try:
            await self._store_state()
        except BaseException:
            # Failed before the state file was replaced: the old state stands. Failed after
            # (syncing the directory): readers already see the new one, and so do we.
            if self._version == version:
                self.state = old_state
            raise

    def _state_file(self) -> CheckpointState:
        tracked = self.state.tracked
        return CheckpointState(
            model_checkpoint_path=self.state.latest or "",
            all_model_checkpoint_paths=tuple(t.path for t in tracked),
            all_model_checkpoint_timestamps=tuple(t.timestamp for t in tracked),
            last_preserved_timestamp=self.state.last_preserved,
        )

    async def _store_state(self) -> None:
        """Write the state file from :attr:`state`: only while the lock is ours, and only
        over the version last read or written (compare-and-swap)."""
        data = encode_state(self._state_file())
        path = self.path(STATE_FILE)
        lock = self._lock
        if lock is None:
            raise RuntimeError("use the manager inside 'async with'")
        storage, durable = self.storage, self.settings.durable

        def write() -> str:
            lock.confirm()
            try:
                return storage.replace_if(path, data, self._version, durable=durable)
            except ConcurrentWriterError:
                raise ConcurrentWriterError(
                    "the state file was changed by another writer since this manager read or "
                    "wrote it; not overwriting it",
                    path=storage.url(path),
                ) from None
            except Exception:
                # Failed, but perhaps after taking effect (an NFS rename whose reply was
                # lost): if the file holds exactly our bytes, it is our write; adopt its
                # version, or every later write would look like another writer's.
                try:
                    found, version = storage.read_versioned(path, max_size=MAX_STATE_FILE_SIZE)
                except Exception:
                    found, version = None, None
                if found == data and version is not None:
                    self._version = version
                raise

        await anyio.to_thread.run_sync(storage.makedirs, self.root)
        self._version = await anyio.to_thread.run_sync(write)
        if durable:
            await anyio.to_thread.run_sync(storage.sync_directory, self.root)

    async def discard(self, name: str) -> None:
        """Best effort: delete the files of a save that never committed. Skipped if the state
        file names it after all (a state write that failed after replacing the file); what
        is left here, the next manager's start-up cleanup removes."""
        with anyio.CancelScope(shield=True):
            try:
                if await self.committed(name):
                    return
                await self._delete_checkpoint(name)
            except Exception:
                pass

    async def committed(self, name: str) -> bool:
        """Whether the state file on disk names ``name`` (raises if it cannot be read)."""
        state = await read_state(self.storage, self.root)
        return state is not None and any(
            posixpath.basename(p) == name
            for p in (state.model_checkpoint_path, *state.all_model_checkpoint_paths)
        )

    async def _delete_checkpoints(self, names: list[str]) -> list[str]:
        """Delete checkpoints retention dropped, oldest first; return their public prefixes.

        One is deleted as it is found. Several (the first sweep of a long state file, a
        lower ``max_to_keep``) are checked against one listing of the directory first: one
        with no file on disk costs a lookup in that listing, not a format detection (which
        may list the directory again), so the sweep stays linear in the directory's size."""
        on_disk = None
        if len(names) > 1:
            on_disk = NameIndex(await anyio.to_thread.run_sync(self.storage.listdir, self.root))
        for name in names:
            if on_disk is None or on_disk.may_hold(name):
                await self._delete_checkpoint(name)
        return [self.public(name) for name in names]

    async def _delete_checkpoint(self, name: str) -> None:
        prefix = self.path(name)
        fmt = await self.format_of(prefix)
        files = await fmt.files(self.storage, prefix)
        for path in reversed(files):  # the commit marker (last written) goes first
            if posixpath.dirname(path) != self.root:
                raise CheckpointError(f"format listed {path} outside the directory")
            await anyio.to_thread.run_sync(self.storage.remove, path)
        await anyio.to_thread.run_sync(self.storage.remove, meta_path(prefix))  # after the data
        await anyio.to_thread.run_sync(self.storage.remove, metrics_path(prefix))
        self.metrics.pop(name, None)

    # -- retention and metrics ---------------------------------------------------------------

    def decide(
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
            Candidate(t.path, t.timestamp, self.step_of(t.path), self.metrics.get(t.path, {}))
            for t in tracked
        ]
        retention = self.settings.retention
        if now is None:  # read the clock only for a policy that needs it (as TF's sweep)
            needs = retention is not None and any(isinstance(p, KeepFor) for p in retention.parts())
            now = self.settings.clock() if needs else 0.0
        return decide(
            candidates, last_preserved, retention, now=now, latest=latest, explain=explain
        )

    async def load_metrics(self, names: Sequence[str]) -> None:
        """Read the metrics sidecars of ``names`` not read yet (a missing one: no metrics)."""

        def read(name: str) -> dict[str, float]:
            path = metrics_path(self.path(name))
            try:
                data = self.storage.read_bytes(path, max_size=MAX_METRICS_SIZE)
            except CheckpointNotFoundError:
                return {}
            try:
                return decode_metrics(data)
            except DecodeError as exc:
                raise CorruptCheckpointError(str(exc), path=self.storage.url(path)) from None

        for name in names:
            if name not in self.metrics:
                self.metrics[name] = await anyio.to_thread.run_sync(read, name)

    async def format_of(self, prefix: str, *, missing_ok: bool = True) -> CheckpointFormat:
        """The format of the checkpoint at ``prefix``: the manager's own format first, so
        its retention and restores never depend on other formats (plugins) loading."""
        own = self.settings.format
        if await own.detect(self.storage, prefix):
            return own
        try:
            return await detect_format(self.storage, prefix)
        except CheckpointNotFoundError:
            if not missing_ok:
                raise
            return own
