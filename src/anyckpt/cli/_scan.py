"""Reading a checkpoint directory as a whole: which checkpoints it holds, what the state file
says about each, and what interrupted saves left behind. ``ls``, ``verify DIR`` and ``prune``
build on this.

A checkpoint is found by asking the registered formats (``detect``) about names derived from
the directory listing and the state file, so plugin formats and TensorFlow-written directories
are listed like anyckpt's own. Files are claimed by the first checkpoint whose ``files()``
names them; what nobody claims is an orphan or simply another file (``.meta`` graphs and the
like). What is an orphan, and which checkpoints are uncommitted, is the manager's rule
(:func:`anyckpt.formats.layout.debris_reasons`, for the directory's ``checkpoint_name``): ``ls``
shows what a manager opening the directory removes, and ``prune`` removes the same.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from functools import partial

import anyio
import anyio.to_thread

from ..codecs import DecodeError
from ..codecs.metrics import MAX_METRICS_SIZE, decode_metrics
from ..codecs.state_file import CheckpointState, relativize
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageAccessError,
    UnsafePathError,
    UnsupportedFormatError,
)
from ..formats import broken_plugins, detect_format, layout, plugin_error
from ..formats.base import CheckpointFormat
from ..formats.layout import file_name, metrics_path, parse_file_name, shard_of
from ..lease import LOCK_FILE, LockInfo, read_lock
from ..manager import STATE_FILE, NameIndex, read_state
from ..retention import RecoveredState, recover
from ..storage import Storage, Upload
from ._common import state_error_text

#: The status of a checkpoint in a directory.
TRACKED = "tracked"  # in the state file: retention counts it and may delete it
PRESERVED = "preserved"  # not tracked: retention never deletes it
UNTRACKED = "untracked"  # no state file at all
UNCOMMITTED = "uncommitted"  # complete but newer than the latest commit: a manager removes it
#: A manager's ``checkpoint_name`` when none is given (and the directory's latest names none).
DEFAULT_CHECKPOINT_NAME = "ckpt"
#: Roles of files of a checkpoint (V2's index and data files, TensorFlow's graph), never a
#: checkpoint prefix themselves: only the prefix they extend is asked about.
_PART_OF_A_PREFIX = (layout.INDEX, layout.META, layout.DATA)
#: Roles of files no checkpoint consists of (their checkpoint's files are the final names).
_NOT_OF_A_PREFIX = (layout.TEMP, layout.STATE)


@dataclass
class FileInfo:
    name: str
    size: int | None
    mtime: float | None


@dataclass
class CheckpointInfo:
    name: str  # prefix relative to the directory
    path: str  # storage path of the prefix
    url: str  # the prefix as the user would write it
    format: CheckpointFormat
    files: list[FileInfo]
    step: int | None
    stem: str | None  # the name without "-STEP" (a manager's checkpoint_name)
    time: float | None = None
    time_source: str = "file"
    status: str = UNTRACKED
    latest: bool = False
    in_state_file: bool = False
    metrics: dict[str, float] | None = None  # from its sidecar (PREFIX.metrics.json), if any

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass
class Orphan:
    name: str
    size: int | None
    reason: str


@dataclass
class Unreadable:
    """A checkpoint the state file names whose files are there but could not be read."""

    name: str
    files: list[FileInfo]
    reason: str
    exit_code: int  # 4: no format reads it; 5: reading failed


@dataclass
class Listing:
    """Everything ``anyckpt ls`` knows about a directory."""

    storage: Storage
    root: str
    url: str
    state: CheckpointState | None
    state_error: str | None
    recovered: RecoveredState | None
    checkpoints: list[CheckpointInfo]
    missing: list[str]  # named by the state file, not on disk
    unsafe: list[str]  # paths in the state file that were refused
    orphans: list[Orphan]
    other: list[FileInfo]
    latest: str | None = None
    problems: list[str] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)  # unfinished multipart uploads
    lock: LockInfo | None = None  # a ``checkpoint.lock`` left in the directory
    #: The ``checkpoint_name`` the debris was computed for, and the debris: every file a
    #: manager of that name opening the directory removes, with why
    #: (:func:`anyckpt.formats.layout.debris_reasons`): the orphans, and the files of
    #: uncommitted checkpoints.
    debris_name: str = DEFAULT_CHECKPOINT_NAME
    debris: dict[str, str] = field(default_factory=dict)


def split_step(name: str) -> tuple[str | None, int | None]:
    """``ckpt-12`` -> ``("ckpt", 12)``; V1 shard patterns (``m-5-?????-of-00002``) too."""
    return layout.split_name_step(name)


def list_files(storage: Storage, root: str) -> list[FileInfo] | None:
    """The files directly in ``root`` with sizes and times; None if it is not a directory."""
    stats = storage.list_files(root)
    if stats is None:
        return None
    return [FileInfo(f.name, f.size, f.mtime) for f in stats]


def _candidates(names: list[str], state_names: list[str]) -> list[str]:
    """Prefixes worth asking the formats about, most likely first."""
    ordered: dict[str, int] = {}
    for name in state_names:
        ordered.setdefault(name, 0)
    derived: set[str] = set()
    for name in names:
        parsed = parse_file_name(name)
        role = parsed.role if parsed is not None else None
        if role is None or role in _NOT_OF_A_PREFIX:
            continue
        if role not in _PART_OF_A_PREFIX:  # (the files of X: X.index, X.data-..., X.meta)
            derived.add(name)
        if "." in name:
            derived.add(name.rsplit(".", 1)[0])
        shard = shard_of(name) if role == layout.V1_SHARD else None
        if parsed is not None and shard is not None:
            derived.add(file_name(parsed.stem, layout.V1_PATTERN, num_shards=shard[1]))
    for name in sorted(derived, key=lambda n: (len(n), n)):
        ordered.setdefault(name, 1)
    return list(ordered)


def _safe_name(raw: str, root: str) -> str | None:
    try:
        return relativize(raw, root)
    except CheckpointError:
        return None


async def _detect(storage: Storage, path: str) -> CheckpointFormat | Exception | None:
    """The format of the checkpoint at ``path``; None if no format recognises it; the error
    if detecting failed (unreadable, a plugin's bug...)."""
    try:
        return await detect_format(storage, path)
    except StorageAccessError:  # the store, not this checkpoint
        raise
    except CheckpointNotFoundError:
        return None
    except Exception as exc:
        return exc


def _why_unreadable(error: Exception | None) -> tuple[str, int]:
    """Why the files of ``name`` could not be read as a checkpoint, and the exit status."""
    if error is not None:
        blamed = plugin_error(error)
        if blamed is not None:
            return str(blamed), 5
        code = 4 if isinstance(error, UnsupportedFormatError) else 5
        return f"{type(error).__name__}: {error}" if code == 5 else str(error), code
    broken = broken_plugins()
    if broken:
        return "no installed format recognises them; " + "; ".join(broken.values()), 4
    return "no installed format recognises them (is its plugin installed?)", 4


async def scan(
    storage: Storage, root: str, *, now: float | None = None, checkpoint_name: str | None = None
) -> Listing:
    """Read the directory ``root``: raises CheckpointNotFoundError if it does not exist.
    Debris is what a manager named ``checkpoint_name`` (default: the latest checkpoint's
    name, else ``ckpt``) removes on opening it."""
    url = storage.url(root)
    files = await anyio.to_thread.run_sync(list_files, storage, root)
    if files is None:
        if await anyio.to_thread.run_sync(storage.exists, root):
            raise CheckpointNotFoundError(
                "not a directory (for one checkpoint, use 'anyckpt inspect')", path=url
            )
        raise CheckpointNotFoundError("no such directory", path=url)
    by_name = {f.name: f for f in files}
    now = time.time() if now is None else now

    state: CheckpointState | None = None
    state_error: str | None = None
    try:
        state = await read_state(storage, root)
    except CorruptCheckpointError as exc:
        state_error = state_error_text(exc)
    except OSError as exc:  # e.g. the state file is a directory, or unreadable
        state_error = exc.strerror or str(exc)
    state_names: list[str] = []
    unsafe: list[str] = []
    latest: str | None = None
    recovered: RecoveredState | None = None
    if state is not None:
        for raw in state.all_model_checkpoint_paths:
            safe = _safe_name(raw, root)
            if safe is None:
                unsafe.append(raw)
            else:
                state_names.append(safe)
        if state.model_checkpoint_path:
            try:
                latest = relativize(state.model_checkpoint_path, root)
            except CheckpointError:
                unsafe.append(state.model_checkpoint_path)
        stamps = state.all_model_checkpoint_timestamps if not unsafe else ()
        recovered = recover(state_names, stamps, state.last_preserved_timestamp, now)
    listed = [*state_names, *([latest] if latest and latest not in state_names else [])]
    debris_name = checkpoint_name or split_step(latest or "")[0] or DEFAULT_CHECKPOINT_NAME
    tracked_names = {t.path for t in recovered.tracked} if recovered else set()
    doomed = layout.debris_reasons(
        by_name, tracked_names, checkpoint_name=debris_name, latest=latest
    )

    # Names from the state file are asked about only if a file may belong to them: a state
    # file listing 100,000 names of long-deleted checkpoints costs lookups, not probes.
    on_disk = NameIndex(list(by_name))
    candidates = _candidates(list(by_name), [n for n in listed if on_disk.may_hold(n)])
    formats: dict[str, CheckpointFormat | Exception | None] = {}
    limiter = anyio.CapacityLimiter(16)

    async def probe(name: str) -> None:
        async with limiter:
            formats[name] = await _detect(storage, posixpath.join(root, name))

    with storage.listing_snapshot(root, list(by_name)):
        async with anyio.create_task_group() as tg:
            for name in candidates:
                tg.start_soon(probe, name)

        claimed: set[str] = set()
        checkpoints: list[CheckpointInfo] = []
        problems: list[str] = []
        for name in candidates:
            fmt = formats.get(name)
            if fmt is None or isinstance(fmt, Exception) or name in claimed:
                continue
            path = posixpath.join(root, name)
            try:
                paths = await fmt.files(storage, path)
            except StorageAccessError:
                raise
            except (CheckpointError, OSError):
                continue
            names = [posixpath.basename(p) for p in paths if posixpath.dirname(p) == root]
            if not names or any(n in claimed for n in names):
                continue
            claimed.update(names)
            stem, step = split_step(name)
            infos = [by_name.get(n) or FileInfo(n, None, None) for n in names]
            mtimes = [f.mtime for f in infos if f.mtime is not None]
            checkpoints.append(
                CheckpointInfo(
                    name,
                    path,
                    storage.url(path),
                    fmt,
                    infos,
                    step,
                    stem,
                    time=max(mtimes) if mtimes else None,
                )
            )

    for ckpt in checkpoints:  # the metrics sidecar is one of its checkpoint's files
        sidecar = posixpath.basename(metrics_path(ckpt.name))
        if sidecar in by_name and sidecar not in claimed:
            claimed.add(sidecar)
            ckpt.files.append(by_name[sidecar])
            path = posixpath.join(root, sidecar)
            try:
                sidecar_bytes = await anyio.to_thread.run_sync(
                    partial(storage.read_bytes, path, max_size=MAX_METRICS_SIZE)
                )
                ckpt.metrics = decode_metrics(sidecar_bytes)
            except (DecodeError, CheckpointError) as exc:
                problems.append(f"{sidecar}: {exc}")

    tracked = {t.path: t.timestamp for t in recovered.tracked} if recovered else {}
    in_state = set(listed)
    for ckpt in checkpoints:
        ckpt.in_state_file = ckpt.name in in_state
        ckpt.latest = ckpt.name == latest
        if ckpt.name in tracked:
            ckpt.status = TRACKED
            ckpt.time, ckpt.time_source = tracked[ckpt.name], "state file"
        elif state is None:
            ckpt.status = UNTRACKED
        elif all(f.name in doomed for f in ckpt.files):  # the manager's rule: it removes them
            ckpt.status = UNCOMMITTED
        else:
            ckpt.status = PRESERVED
        if ckpt.status != UNCOMMITTED and any(f.name in doomed for f in ckpt.files):
            # A manager removes these and leaves the checkpoint (the sidecar of a plugin's
            # newer checkpoint): listed with the debris, not as its files.
            gone = {f.name for f in ckpt.files if f.name in doomed}
            ckpt.files = [f for f in ckpt.files if f.name not in gone]
            claimed -= gone
            if posixpath.basename(metrics_path(ckpt.name)) in gone:
                ckpt.metrics = None
    checkpoints.sort(key=lambda c: (c.step is None, c.step or 0, c.name))

    found = {c.name for c in checkpoints}
    missing: list[str] = []
    unreadable: list[Unreadable] = []
    for name in listed:
        if name in found:
            continue
        # Files of it may be there, in a format no installed plugin reads (or whose plugin
        # failed to load): present, not missing.
        # (A V2 data file without its index is what an interrupted delete leaves: debris,
        # listed below, not an unreadable checkpoint.)
        present = [
            by_name[n]
            for n in on_disk.belonging(name)
            if n not in claimed and n not in doomed and layout.role_of(n) not in _NOT_OF_A_PREFIX
        ]
        if not present:
            missing.append(name)
            continue
        error = formats.get(name)
        reason, code = _why_unreadable(error if isinstance(error, Exception) else None)
        unreadable.append(Unreadable(name, present, reason, code))
        claimed.update(f.name for f in present)
    orphans: list[Orphan] = []
    other: list[FileInfo] = []
    lock: LockInfo | None = None
    for info in files:
        if info.name in claimed or info.name == STATE_FILE:
            continue
        if info.name == LOCK_FILE:
            try:
                lock = await anyio.to_thread.run_sync(read_lock, storage, root, now)
            except UnsafePathError as exc:  # planted: a manager refuses it too, and says so
                problems.append(f"{LOCK_FILE}: {exc}")
            continue
        if info.name in doomed:
            orphans.append(Orphan(info.name, info.size, doomed[info.name]))
        else:
            other.append(info)
    uploads = await anyio.to_thread.run_sync(storage.list_uploads, root)
    return Listing(
        storage,
        root,
        url,
        state,
        state_error,
        recovered,
        checkpoints,
        missing,
        unsafe,
        orphans,
        other,
        latest,
        problems,
        unreadable=unreadable,
        uploads=uploads,
        lock=lock,
        debris_name=debris_name,
        debris=doomed,
    )
