"""Checkpoint file names, in one place: what role a file of a checkpoint directory plays
(:func:`parse_file_name`), which files may belong to a prefix (:class:`NameIndex`) and which
are left-overs of interrupted saves (:func:`debris`)."""

from __future__ import annotations

import bisect
import re
from collections.abc import Collection, Iterable, Sequence
from typing import NamedTuple

from ..codecs.metrics import METRICS_SUFFIX
from ..storage import TEMP_MARKER

#: The state file's name (TensorFlow's ``checkpoint``).
STATE_FILE = "checkpoint"

#: The roles :func:`parse_file_name` gives.
INDEX = "index"  # V2: PREFIX.index
DATA = "data"  # V2: PREFIX.data-SSSSS-of-NNNNN
V1_SHARD = "v1-shard"  # V1 sharded: PREFIX-SSSSS-of-NNNNN
V1_PATTERN = "v1-pattern"  # the name TensorFlow records for it: PREFIX-?????-of-NNNNN
META = "meta"  # TensorFlow's graph: PREFIX.meta
METRICS = "metrics"  # our sidecar: PREFIX.metrics.json
TEMP = "temp"  # a writer's temporary name of any file: NAME.anyckpt-tmp-HEX (stem = NAME)
STATE = "state"  # the state file
PLAIN = "plain"  # none of the above: a V1 single file, a prefix, a plugin's file
ROLES = (INDEX, DATA, V1_SHARD, V1_PATTERN, META, METRICS, TEMP, STATE, PLAIN)

_DATA = re.compile(r"(.+)\.data-(\d{5})-of-(\d{5})")
_V1_SHARD = re.compile(r"(.+)-(\d{5})-of-(\d{5})")
_V1_PATTERN = re.compile(r"(.+)-\?{5}-of-(\d{5})")
_SUFFIXES = ((".index", INDEX), (".meta", META), (METRICS_SUFFIX, METRICS))


class FileName(NamedTuple):
    """A file name split by :func:`parse_file_name`: the prefix (for ``temp``, the final name
    the temporary file becomes) and the role."""

    stem: str
    role: str


def parse_file_name(name: str) -> FileName | None:
    """The checkpoint prefix and role of the file ``name`` (a base name, no directory), or
    None for a name no file can have (empty, ``.``/``..``, holding ``/``). Names no built-in
    format explains are ``(name, "plain")``: a V1 single file, a plugin's file..."""
    if not name or name in (".", "..") or "/" in name:
        return None
    if TEMP_MARKER in name:
        stem = name.split(TEMP_MARKER, 1)[0]
        return FileName(stem, TEMP) if stem else None
    if name == STATE_FILE:
        return FileName(name, STATE)
    for suffix, role in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return FileName(name[: -len(suffix)], role)
    for pattern, role in ((_DATA, DATA), (_V1_SHARD, V1_SHARD), (_V1_PATTERN, V1_PATTERN)):
        match = pattern.fullmatch(name)
        if match:
            return FileName(match.group(1), role)
    return FileName(name, PLAIN)


def file_name(stem: str, role: str, shard: int = 0, num_shards: int = 1) -> str:
    """The name of the file of ``stem`` playing ``role`` (the inverse of
    :func:`parse_file_name`; ``temp`` gets a fixed suffix)."""
    if role == DATA:
        return f"{stem}.data-{shard:05d}-of-{num_shards:05d}"
    if role == V1_SHARD:
        return f"{stem}-{shard:05d}-of-{num_shards:05d}"
    if role == V1_PATTERN:
        return f"{stem}-?????-of-{num_shards:05d}"
    if role == TEMP:
        return f"{stem}{TEMP_MARKER}00000000"
    if role in (STATE, PLAIN):
        return stem
    return stem + {r: s for s, r in _SUFFIXES}[role]


def shard_of(name: str) -> tuple[int, int] | None:
    """``(shard, num_shards)`` of a V2 data file or a V1 shard (``num_shards`` alone, as
    ``(-1, n)``, for a V1 pattern ``PREFIX-?????-of-N``), else None."""
    parsed = parse_file_name(name)
    if parsed is None or parsed.role not in (DATA, V1_SHARD, V1_PATTERN):
        return None
    shard, num_shards = name[-15:-10], name[-5:]
    return (-1 if shard == "?????" else int(shard)), int(num_shards)


def checkpoint_of(name: str) -> str | None:
    """The checkpoint prefix a (non-temporary) file belongs to: ``ckpt-5`` for
    ``ckpt-5.index``, ``ckpt-5.data-…``, ``ckpt-5-00000-of-00002``, ``ckpt-5.meta``..."""
    parsed = parse_file_name(name)
    if parsed is None or parsed.role in (TEMP, STATE, V1_PATTERN):
        return None
    return parsed.stem


def split_step(name: str, checkpoint_name: str) -> int | None:
    """The step of the prefix ``name`` if a manager named ``checkpoint_name`` wrote it
    (``ckpt-5``, or a V1 sharded ``ckpt-5-?????-of-00002``), else None."""
    match = re.fullmatch(re.escape(checkpoint_name) + r"-(\d+)(-\?{5}-of-\d{5})?", name)
    return int(match.group(1)) if match else None


def is_managed(base: str, checkpoint_name: str) -> bool:
    """Whether ``base`` may be a file of any format for a checkpoint of a manager named
    ``checkpoint_name`` (``ckpt-5``, ``ckpt-5.index``, ``ckpt-5-00000-of-00002``,
    ``ckpt-5.zst``...), or its state file."""
    if base == STATE_FILE:
        return True
    return re.fullmatch(re.escape(checkpoint_name) + r"-\d+([.-][\w.-]*)?", base) is not None


def debris(
    names: Iterable[str], tracked: Collection[str], *, checkpoint_name: str, latest: str | None
) -> list[str]:
    """What interrupted saves of a manager named ``checkpoint_name`` left in a directory
    listing ``names``, index files first (commit markers go first). ``tracked`` and
    ``latest`` are the state file's checkpoints (relative prefixes).

    - temporary files of any format's writer, for one of its checkpoints or the state file;
    - V2 index and data files, ``.meta`` graphs and metrics sidecars of a checkpoint newer than
      ``latest`` and not tracked (written, never recorded);
    - data files (and an index) without their index: an interrupted save or delete;
    - ``.meta`` and metrics sidecars whose checkpoint has no file left.
    Without a state file (``latest`` None) nothing counts as newer."""
    names = list(names)
    present = set(names)
    latest_step = split_step(latest, checkpoint_name) if latest else None
    parsed = [(n, parse_file_name(n)) for n in names]
    stems = {p.stem for _, p in parsed if p is not None and p.role in (INDEX, DATA, V1_SHARD)}
    stems.update(n for n, p in parsed if p is not None and p.role in (PLAIN, V1_PATTERN, STATE))
    doomed: list[str] = []
    for name, p in parsed:
        if p is None:
            continue
        if p.role == TEMP:
            if is_managed(p.stem, checkpoint_name):
                doomed.append(name)
            continue
        if p.role not in (INDEX, DATA, META, METRICS):
            continue
        match = re.fullmatch(re.escape(checkpoint_name) + r"-(\d+)", p.stem)
        if match is None:
            continue
        step = int(match.group(1))
        prefix = f"{checkpoint_name}-{step}"
        if latest == prefix:
            continue
        newer = latest_step is not None and step > latest_step and prefix not in tracked
        if p.role in (META, METRICS):  # they stay while the checkpoint has files
            if newer or prefix not in stems:
                doomed.append(name)
        elif newer or f"{prefix}.index" not in present:
            doomed.append(name)
    doomed.sort(key=lambda n: not n.endswith(".index"))
    return doomed


class NameIndex:
    """The names in a directory, sorted, to ask in O(log n) whether a file may belong to a
    checkpoint: one named as its prefix, or starting with it and a ``.`` or ``-``
    (``ckpt-5.index``, ``ckpt-5-00000-of-00002``, ``ckpt-5.zst``, ``ckpt-5.meta``...)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = sorted(names)

    def _starts(self, text: str) -> bool:
        i = bisect.bisect_left(self._names, text)
        return i < len(self._names) and self._names[i].startswith(text)

    def may_hold(self, prefix: str) -> bool:
        stem = prefix.split("-?", 1)[0]  # a V1 pattern: ``ckpt-5-?????-of-00002``
        i = bisect.bisect_left(self._names, stem)
        exact = i < len(self._names) and self._names[i] == stem
        return exact or self._starts(stem + ".") or self._starts(stem + "-")

    def belonging(self, prefix: str) -> list[str]:
        """The names that may belong to ``prefix`` (as :meth:`may_hold` asks), in O(log n +
        the names returned)."""
        stem = prefix.split("-?", 1)[0]
        names = self._names
        out: list[str] = []
        i = bisect.bisect_left(names, stem)
        if i < len(names) and names[i] == stem:
            out.append(stem)
        for start in (stem + ".", stem + "-"):
            i = bisect.bisect_left(names, start)
            while i < len(names) and names[i].startswith(start):
                out.append(names[i])
                i += 1
        return out
