"""Checkpoint file names, in one place: what role a file of a checkpoint directory plays
(:func:`parse_file_name`), the names a checkpoint's files get (:func:`file_name`,
:func:`meta_path`, :func:`metrics_path`, :func:`v1_shard_path`...), which files may belong to a
prefix (:class:`NameIndex`) and which are left-overs of interrupted saves (:func:`debris`).

Every other module asks here: no other module spells ``.index``, ``.data-``, ``-of-`` or a
step pattern (``tests/test_layout.py`` checks that the source holds no such copy)."""

from __future__ import annotations

import bisect
import re
from collections.abc import Collection, Iterable, Sequence
from typing import NamedTuple

from ..storage import TEMP_MARKER

#: The state file's name (TensorFlow's ``checkpoint``).
STATE_FILE = "checkpoint"
#: The suffix of our metrics sidecar (:mod:`anyckpt.codecs.metrics` encodes its content).
METRICS_SUFFIX = ".metrics.json"

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
_SUFFIX_OF = {role: suffix for suffix, role in _SUFFIXES}
_STEP = re.compile(r"(.+)-(\d+)")


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


def final_name(name: str) -> str:
    """The name the temporary file ``name`` becomes (``ckpt-5.index`` for
    ``ckpt-5.index.anyckpt-tmp-HEX``); any other name as it is."""
    parsed = parse_file_name(name)
    return parsed.stem if parsed is not None and parsed.role == TEMP else name


def role_of(name: str) -> str | None:
    """The role of the file ``name`` (a base name), as :func:`parse_file_name` gives it."""
    parsed = parse_file_name(name)
    return parsed.role if parsed is not None else None


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
    return stem + _SUFFIX_OF[role]


def shard_of(name: str) -> tuple[int, int] | None:
    """``(shard, num_shards)`` of a V2 data file or a V1 shard (``num_shards`` alone, as
    ``(-1, n)``, for a V1 pattern ``PREFIX-?????-of-N``), else None."""
    parsed = parse_file_name(name)
    if parsed is None or parsed.role not in (DATA, V1_SHARD, V1_PATTERN):
        return None
    shard, num_shards = name[-15:-10], name[-5:]
    return (-1 if shard == "?????" else int(shard)), int(num_shards)


def v1_shard_path(prefix: str, shard: int, num_shards: int) -> str:
    """The path of shard ``shard`` of a V1 checkpoint saved in ``num_shards`` files
    (``PREFIX-SSSSS-of-NNNNN``); ``prefix`` may hold a directory."""
    return file_name(prefix, V1_SHARD, shard, num_shards)


def v1_pattern_path(prefix: str, num_shards: int) -> str:
    """The path TensorFlow records for a sharded V1 checkpoint (``PREFIX-?????-of-NNNNN``)."""
    return file_name(prefix, V1_PATTERN, num_shards=num_shards)


def split_v1_pattern(path: str) -> tuple[str, int] | None:
    """``(prefix, num_shards)`` of a V1 pattern path ``[DIR/]PREFIX-?????-of-NNNNN``, else
    None."""
    directory, base = _split_dir(path)
    match = _V1_PATTERN.fullmatch(base)
    return (directory + match.group(1), int(match.group(2))) if match else None


def v1_shard_number(name: str, stem: str) -> tuple[int, int] | None:
    """``(shard, num_shards)`` if the base name ``name`` is a V1 shard of the prefix ``stem``
    (``STEM-SSSSS-of-NNNNN``; a base name too), else None. Unlike :func:`parse_file_name`, the
    stem is given: ``model.data-00000-of-00002`` is a shard of ``model.data`` here."""
    match = _V1_SHARD.fullmatch(name)
    if match is None or match.group(1) != stem:
        return None
    return int(match.group(2)), int(match.group(3))


def _split_dir(path: str) -> tuple[str, str]:
    """``("DIR/", "NAME")`` of ``DIR/NAME`` (``("", path)`` without a directory)."""
    cut = path.rfind("/") + 1
    return path[:cut], path[cut:]


def _stem_of(prefix: str) -> str:
    """``prefix``, or the prefix of a V1 pattern ``PREFIX-?????-of-N``."""
    parts = split_v1_pattern(prefix)
    return parts[0] if parts else prefix


def _sidecar(prefix: str, role: str) -> str:
    return file_name(_stem_of(prefix), role)


def meta_path(prefix: str) -> str:
    """The ``.meta`` graph of a checkpoint prefix (of a V1 sharded pattern
    ``PREFIX-?????-of-N`` too: ``PREFIX.meta``, as TensorFlow names it)."""
    return _sidecar(prefix, META)


def metrics_path(prefix: str) -> str:
    """The metrics sidecar of a checkpoint prefix (of a V1 sharded pattern
    ``PREFIX-?????-of-N`` too: ``PREFIX.metrics.json``)."""
    return _sidecar(prefix, METRICS)


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
    return step_of(_stem_of(name), checkpoint_name)


def step_of(stem: str, checkpoint_name: str | None = None) -> int | None:
    """The step of the checkpoint prefix ``stem`` (``ckpt-5`` -> 5), named by a manager named
    ``checkpoint_name`` (any name when None), else None. No V1 pattern: see
    :func:`split_step`."""
    match = _STEP.fullmatch(stem)
    if match is None or (checkpoint_name is not None and match.group(1) != checkpoint_name):
        return None
    return int(match.group(2))


def split_name_step(name: str) -> tuple[str | None, int | None]:
    """``ckpt-12`` -> ``("ckpt", 12)``; a V1 pattern ``m-5-?????-of-00002`` -> ``("m", 5)``;
    ``(None, None)`` for a name without a step."""
    match = _STEP.fullmatch(_stem_of(name))
    return (match.group(1), int(match.group(2))) if match else (None, None)


def is_managed(base: str, checkpoint_name: str) -> bool:
    """Whether ``base`` may be a file of any format for a checkpoint of a manager named
    ``checkpoint_name`` (``ckpt-5``, ``ckpt-5.index``, ``ckpt-5-00000-of-00002``,
    ``ckpt-5.zst``...), or its state file."""
    if base == STATE_FILE:
        return True
    return re.fullmatch(re.escape(checkpoint_name) + r"-\d+([.-][\w.-]*)?", base) is not None


#: Why :func:`debris_reasons` names a file (``anyckpt ls`` and ``prune`` print these).
TEMP_FILE = "temporary file of an interrupted write"
NO_INDEX = "data file without its index"
UNRECORDED = "complete, but saved after the latest commit and never recorded in the state file"
NO_CHECKPOINT = {
    META: "graph (.meta) of a checkpoint not on disk",
    METRICS: "metrics of a checkpoint not on disk",
}


def debris(
    names: Iterable[str], tracked: Collection[str], *, checkpoint_name: str, latest: str | None
) -> list[str]:
    """What interrupted saves of a manager named ``checkpoint_name`` left in a directory
    listing ``names``, index files first (commit markers go first): the names
    :func:`debris_reasons` gives."""
    return list(debris_reasons(names, tracked, checkpoint_name=checkpoint_name, latest=latest))


def debris_reasons(
    names: Iterable[str], tracked: Collection[str], *, checkpoint_name: str, latest: str | None
) -> dict[str, str]:
    """What interrupted saves of a manager named ``checkpoint_name`` left in a directory
    listing ``names``, with why, index files first (commit markers go first). ``tracked`` and
    ``latest`` are the state file's checkpoints (relative prefixes).

    - temporary files of any format's writer, for one of its checkpoints or the state file;
    - V2 index and data files, ``.meta`` graphs and metrics sidecars of a checkpoint newer than
      ``latest`` and not tracked (written, never recorded);
    - data files (and an index) without their index: an interrupted save or delete;
    - ``.meta`` and metrics sidecars whose checkpoint has no file left (of any format: a
      plugin's ``ckpt-5.zst`` keeps ``ckpt-5.metrics.json``).
    Without a state file (``latest`` None) nothing counts as newer. The manager's cleaning on
    open, ``anyckpt ls`` and ``anyckpt prune`` all ask this one rule."""
    names = list(names)
    present = set(names)
    latest_step = split_step(latest, checkpoint_name) if latest else None
    on_disk: NameIndex | None = None  # built on the first sidecar asked about
    found: dict[str, str] = {}
    for name in names:
        p = parse_file_name(name)
        if p is None:
            continue
        if p.role == TEMP:
            if is_managed(p.stem, checkpoint_name):
                found[name] = TEMP_FILE
            continue
        if p.role not in (INDEX, DATA, META, METRICS):
            continue
        step = step_of(p.stem, checkpoint_name)
        if step is None or latest == p.stem:
            continue
        newer = latest_step is not None and step > latest_step and p.stem not in tracked
        if p.role in (META, METRICS):  # they stay while the checkpoint has files
            on_disk = on_disk or NameIndex(names)
            if not _has_files(on_disk, p.stem):
                found[name] = NO_CHECKPOINT[p.role]
            elif newer:
                found[name] = UNRECORDED
        elif file_name(p.stem, INDEX) not in present:
            found[name] = NO_INDEX
        elif newer:
            found[name] = UNRECORDED
    order = sorted(found, key=lambda n: role_of(n) != INDEX)
    return {name: found[name] for name in order}


def _has_files(on_disk: NameIndex, prefix: str) -> bool:
    """Whether a file of the checkpoint ``prefix`` other than its sidecars (and temporary
    files) is in ``on_disk``: its index, data, V1 shards, or a plugin's ``prefix.zst``..."""
    return any(role_of(n) not in (META, METRICS, TEMP, None) for n in on_disk.belonging(prefix))


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
        stem = _stem_of(prefix) if "?" in prefix else prefix  # (hot: no call for most names)
        i = bisect.bisect_left(self._names, stem)
        exact = i < len(self._names) and self._names[i] == stem
        return exact or self._starts(stem + ".") or self._starts(stem + "-")

    def belonging(self, prefix: str) -> list[str]:
        """The names that may belong to ``prefix`` (as :meth:`may_hold` asks), in O(log n +
        the names returned)."""
        stem = _stem_of(prefix) if "?" in prefix else prefix
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
