"""Pure retention policy with the semantics of TensorFlow's ``tf.train.CheckpointManager``.

No I/O and no clock: timestamps (Unix seconds) are passed in, and the manager performs
the deletions decided here. The rules, as TensorFlow implements them
(``tensorflow/python/checkpoint/checkpoint_management.py``):

Tracking. The manager tracks an ordered list of checkpoints (oldest first), each with the
time it was saved. Checkpoints it preserves, or never adopted, are not in the list and are
never deleted by it.

Saving (:func:`record_save`). A new checkpoint is appended with the current time. If its
path is already tracked (a checkpoint number reused), the old entry is removed first, so
the path moves to the end with the new time.

Sweeping (:func:`apply_retention`), after every save:

- ``max_to_keep=None``: nothing is swept and ``last_preserved_timestamp`` is unchanged.
- Otherwise, while more than ``max_to_keep`` are tracked, the oldest leaves the list. It is
  *preserved* (kept on disk, forgotten) if ``keep_checkpoint_every_n_hours`` is set and
  ``timestamp - n * 3600 >= last_preserved_timestamp`` (evaluated in that form, as TF does,
  so float rounding matches); ``last_preserved_timestamp`` then becomes its timestamp, so
  preserved checkpoints are at least n hours apart. Otherwise it is *deleted*.
- ``keep_checkpoint_every_n_hours`` of 0 behaves like ``None`` (TF tests truthiness).

TensorFlow writes the state file once before the sweep (with the new checkpoint added and
nothing removed) and once after; the manager should do the same.

Starting (:func:`start_fresh`, :func:`recover`). Without a state file,
``last_preserved_timestamp`` starts at ``now - 1``. With one, it is the file's value, lowered
to ``now`` if the clock went backwards. The file's timestamps are used; if there are none
(files written by the tf.compat.v1 ``Saver``) every checkpoint gets
``last_preserved_timestamp`` as its timestamp. Each timestamp is capped at ``now``, and only
checkpoints whose timestamp is strictly greater than ``last_preserved_timestamp`` are
tracked; the others are forgotten, left on disk and never deleted. Hence a directory written
by the ``Saver`` (no timestamps, ``last_preserved_timestamp`` 0) has none of its checkpoints
adopted. Nothing is swept at start; a lower ``max_to_keep`` takes effect at the next save.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "RecoveredState",
    "RetentionDecision",
    "RetentionPolicy",
    "Tracked",
    "apply_retention",
    "record_save",
    "recover",
    "start_fresh",
]

_SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class RetentionPolicy:
    """How many checkpoints to keep, and how often to preserve one forever.

    Raises:
        ValueError: if ``max_to_keep`` is not ``None`` or a positive integer (as TF), or
            ``keep_checkpoint_every_n_hours`` is negative or not finite (TF accepts those;
            they make no sense).
    """

    max_to_keep: int | None
    keep_checkpoint_every_n_hours: float | None = None

    def __post_init__(self) -> None:
        if self.max_to_keep is not None and (
            isinstance(self.max_to_keep, bool)
            or not isinstance(self.max_to_keep, int)
            or self.max_to_keep <= 0
        ):
            raise ValueError(
                f"max_to_keep must be a positive integer or None, got {self.max_to_keep!r}"
            )
        hours = self.keep_checkpoint_every_n_hours
        if hours is not None and (not math.isfinite(hours) or hours < 0):
            raise ValueError(
                f"keep_checkpoint_every_n_hours must be a finite number >= 0 or None, got {hours!r}"
            )


@dataclass(frozen=True)
class Tracked:
    """A tracked checkpoint: its path (as recorded in the state file) and save time."""

    path: str
    timestamp: float


@dataclass(frozen=True)
class RetentionDecision:
    """What a sweep decided. Each input checkpoint is in exactly one of the three lists."""

    keep: tuple[Tracked, ...]
    """Still tracked, oldest first."""
    preserve: tuple[Tracked, ...]
    """Kept on disk forever and no longer tracked, oldest first."""
    delete: tuple[Tracked, ...]
    """To delete from disk, oldest first."""
    last_preserved_timestamp: float
    """The value to record in the state file."""


@dataclass(frozen=True)
class RecoveredState:
    """The manager's starting point, from a state file or a fresh directory."""

    tracked: tuple[Tracked, ...]
    """Checkpoints tracked (and so eligible for deletion), oldest first."""
    last_preserved_timestamp: float
    forgotten: tuple[str, ...]
    """Paths listed in the state file but not tracked: left on disk, never deleted."""


def record_save(tracked: Sequence[Tracked], path: str, timestamp: float) -> list[Tracked]:
    """Return ``tracked`` with ``path`` saved at ``timestamp`` appended as the newest.

    An existing entry for ``path`` is removed first, so a re-saved path moves to the end.
    """
    result = [t for t in tracked if t.path != path]
    result.append(Tracked(path, timestamp))
    return result


def apply_retention(
    tracked: Sequence[Tracked], last_preserved_timestamp: float, policy: RetentionPolicy
) -> RetentionDecision:
    """Sweep ``tracked`` (oldest first) as ``CheckpointManager._sweep`` does.

    Raises:
        ValueError: if a path is tracked twice (TF tracks paths in a dict).
    """
    paths = [t.path for t in tracked]
    if len(set(paths)) != len(paths):
        raise ValueError("a checkpoint path is tracked more than once")
    if policy.max_to_keep is None:
        return RetentionDecision(tuple(tracked), (), (), last_preserved_timestamp)
    hours = policy.keep_checkpoint_every_n_hours
    excess = max(0, len(tracked) - policy.max_to_keep)
    preserve: list[Tracked] = []
    delete: list[Tracked] = []
    for ckpt in tracked[:excess]:
        if hours and ckpt.timestamp - hours * _SECONDS_PER_HOUR >= last_preserved_timestamp:
            last_preserved_timestamp = ckpt.timestamp
            preserve.append(ckpt)
        else:
            delete.append(ckpt)
    return RetentionDecision(
        tuple(tracked[excess:]), tuple(preserve), tuple(delete), last_preserved_timestamp
    )


def start_fresh(now: float) -> RecoveredState:
    """The starting point in a directory without a state file (TF: ``time.time() - 1``)."""
    return RecoveredState((), now - 1.0, ())


def recover(
    paths: Sequence[str],
    timestamps: Sequence[float],
    last_preserved_timestamp: float,
    now: float,
) -> RecoveredState:
    """Rebuild the tracked list from a state file, as ``CheckpointManager.__init__`` does.

    ``paths`` and ``timestamps`` are the file's ``all_model_checkpoint_paths`` and
    ``all_model_checkpoint_timestamps`` (already made safe by the caller); ``timestamps``
    is empty or one per path. If a path is listed twice it keeps its first position and
    takes the later accepted timestamp (TF fills a dict).

    Raises:
        ValueError: if ``timestamps`` is neither empty nor as long as ``paths``.
    """
    if timestamps and len(timestamps) != len(paths):
        raise ValueError(f"{len(timestamps)} timestamps for {len(paths)} checkpoint paths")
    last_preserved = min(last_preserved_timestamp, now)
    stamps = timestamps if timestamps else [last_preserved] * len(paths)
    adopted: dict[str, float] = {}
    for path, stamp in zip(paths, stamps, strict=True):
        capped = min(stamp, now)
        if capped > last_preserved:
            adopted[path] = capped
    forgotten = tuple(dict.fromkeys(p for p in paths if p not in adopted))
    return RecoveredState(
        tuple(Tracked(p, t) for p, t in adopted.items()), last_preserved, forgotten
    )
