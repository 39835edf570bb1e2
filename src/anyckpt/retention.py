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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Any",
    "BestN",
    "Candidate",
    "EveryNHours",
    "EveryNSteps",
    "KeepFor",
    "LatestN",
    "Plan",
    "Policy",
    "RecoveredState",
    "RetentionDecision",
    "RetentionPolicy",
    "Steps",
    "Tracked",
    "apply_retention",
    "decide",
    "record_save",
    "recover",
    "start_fresh",
    "tf_policy",
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


# -- composable policies -----------------------------------------------------------------------
#
# A policy says which tracked checkpoints it keeps (and why); :func:`decide` keeps what any part
# of it keeps, plus the latest checkpoint always. What nobody keeps leaves the tracked list,
# oldest first: preserved (kept on disk forever, no longer tracked) if the policy holds an
# :class:`EveryNHours` whose spacing rule accepts it, otherwise deleted. With ``Any(LatestN(n),
# EveryNHours(h))`` this is exactly TensorFlow's sweep (:func:`tf_policy`).


@dataclass(frozen=True)
class Candidate:
    """A tracked checkpoint as policies see it: path and save time (as in the state file),
    its step (None if its name has none) and the metrics recorded when it was saved."""

    path: str
    timestamp: float
    step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def tracked(self) -> Tracked:
        return Tracked(self.path, self.timestamp)


class Policy:
    """Base of the retention policies: which tracked checkpoints to keep, with reasons.

    Subclasses implement :meth:`keep` (pure: no I/O, no clock; ``now`` is passed in) and
    :meth:`why_not`. Combine them with :class:`Any`."""

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        """The paths this policy keeps among ``candidates`` (oldest first), each with a reason."""
        raise NotImplementedError

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        """Why this policy does not keep ``candidate``."""
        raise NotImplementedError

    def parts(self) -> tuple[Policy, ...]:
        """The policy's leaves (itself, or the members of an :class:`Any`)."""
        return (self,)

    @property
    def preserve_hours(self) -> float | None:
        """The spacing of preserved checkpoints, if the policy holds an :class:`EveryNHours`."""
        hours = [p.hours for p in self.parts() if isinstance(p, EveryNHours)]
        return hours[0] if hours else None

    @property
    def metric_names(self) -> frozenset[str]:
        """Metrics the policy reads (the manager loads them only if some are needed)."""
        return frozenset(p.metric for p in self.parts() if isinstance(p, BestN))


def _check_count(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LatestN(Policy):
    """Keep the newest ``n`` tracked checkpoints: TensorFlow's ``max_to_keep``."""

    n: int

    def __post_init__(self) -> None:
        _check_count(self.n, "LatestN's n")

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        return {c.path: f"one of the newest {self.n}" for c in candidates[-self.n :]}

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        return f"beyond the newest {self.n} ({len(candidates)} tracked)"

    def __str__(self) -> str:
        return f"LatestN({self.n})"


@dataclass(frozen=True)
class EveryNHours(Policy):
    """Preserve checkpoints at least ``hours`` apart: TensorFlow's
    ``keep_checkpoint_every_n_hours``. It keeps nothing in the tracked list itself: a
    checkpoint no other policy keeps any more is preserved (kept forever, no longer tracked)
    if ``timestamp - hours * 3600 >= last_preserved_timestamp``, as TensorFlow decides, and
    the state file's ``last_preserved_timestamp`` moves to it. A retention holds at most one."""

    hours: float

    def __post_init__(self) -> None:
        if isinstance(self.hours, bool) or not (
            isinstance(self.hours, (int, float)) and math.isfinite(self.hours) and self.hours > 0
        ):
            raise ValueError(f"EveryNHours needs a finite number of hours > 0, got {self.hours!r}")

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        return {}

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        return f"less than {self.hours:g} h after the last preserved checkpoint"

    def __str__(self) -> str:
        return f"EveryNHours({self.hours:g})"


@dataclass(frozen=True)
class EveryNSteps(Policy):
    """Keep every checkpoint whose step is a multiple of ``k`` (for good: it stays tracked)."""

    k: int

    def __post_init__(self) -> None:
        _check_count(self.k, "EveryNSteps's k")

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        reason = f"step is a multiple of {self.k}"
        return {c.path: reason for c in candidates if c.step is not None and c.step % self.k == 0}

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        if candidate.step is None:
            return "its name has no step"
        return f"step {candidate.step} is not a multiple of {self.k}"

    def __str__(self) -> str:
        return f"EveryNSteps({self.k})"


@dataclass(frozen=True)
class BestN(Policy):
    """Keep the ``n`` tracked checkpoints with the best value of ``metric`` (lowest with
    ``mode="min"``, highest with ``"max"``); ties go to the newer checkpoint. Checkpoints
    without the metric (or with NaN) are never among the best. It never causes the newest
    checkpoint's deletion: the latest is always kept, whatever the policy."""

    n: int
    metric: str
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        _check_count(self.n, "BestN's n")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"BestN needs a metric name, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"BestN's mode must be 'min' or 'max', got {self.mode!r}")

    def ranked(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates holding the metric, best first."""
        scored = [
            (value, -i, c)
            for i, c in enumerate(candidates)
            if (value := _metric(c, self.metric)) is not None
        ]
        sign = 1.0 if self.mode == "min" else -1.0
        scored.sort(key=lambda t: (sign * t[0], t[1]))
        return [c for _, _, c in scored]

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        return {
            c.path: f"{self.metric}={c.metrics[self.metric]:g}, one of the best {self.n} "
            f"({self.mode})"
            for c in self.ranked(candidates)[: self.n]
        }

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        value = _metric(candidate, self.metric)
        if value is None:
            return f"no {self.metric!r} metric recorded"
        return f"{self.metric}={value:g} is not among the best {self.n} ({self.mode})"

    def __str__(self) -> str:
        return f"BestN({self.n}, {self.metric!r}, {self.mode!r})"


def _metric(candidate: Candidate, name: str) -> float | None:
    value = candidate.metrics.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True)
class KeepFor(Policy):
    """Keep every checkpoint saved less than ``seconds`` before ``now`` (a time to live)."""

    seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not (
            isinstance(self.seconds, (int, float))
            and math.isfinite(self.seconds)
            and self.seconds >= 0
        ):
            raise ValueError(f"KeepFor needs a finite number of seconds >= 0, got {self.seconds!r}")

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        reason = f"saved less than {self.seconds:g} s ago"
        return {c.path: reason for c in candidates if now - c.timestamp < self.seconds}

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        return f"saved {now - candidate.timestamp:g} s ago, not less than {self.seconds:g} s"

    def __str__(self) -> str:
        return f"KeepFor({self.seconds:g})"


@dataclass(frozen=True, init=False)
class Steps(Policy):
    """Keep the checkpoints of the given steps (for good: they stay tracked)."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        values = frozenset(steps)
        for s in values:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"Steps takes steps >= 0, got {s!r}")
        object.__setattr__(self, "steps", values)

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        return {c.path: f"step {c.step} is listed" for c in candidates if c.step in self.steps}

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        return f"step {candidate.step} is not listed"

    def __str__(self) -> str:
        return f"Steps({sorted(self.steps)})"


@dataclass(frozen=True, init=False)
class Any(Policy):  # the name; it shadows typing.Any in this module only
    """Keep what any of ``policies`` keeps (nested ``Any`` are flattened). Holds at most one
    :class:`EveryNHours`: the state file has one ``last_preserved_timestamp``."""

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise ValueError("Any needs at least one policy")
        flat: list[Policy] = []
        for p in policies:
            if not isinstance(p, Policy):
                raise TypeError(f"Any takes retention policies, got {p!r}")
            flat.extend(p.parts())
        if sum(isinstance(p, EveryNHours) for p in flat) > 1:
            raise ValueError("a retention holds at most one EveryNHours")
        object.__setattr__(self, "policies", tuple(flat))

    def parts(self) -> tuple[Policy, ...]:
        return self.policies

    def keep(self, candidates: Sequence[Candidate], now: float) -> dict[str, str]:
        kept: dict[str, list[str]] = {}
        for p in self.policies:
            for path, reason in p.keep(candidates, now).items():
                kept.setdefault(path, []).append(f"{p}: {reason}")
        return {path: "; ".join(reasons) for path, reasons in kept.items()}

    def why_not(self, candidate: Candidate, candidates: Sequence[Candidate], now: float) -> str:
        return "; ".join(
            f"{p}: {p.why_not(candidate, candidates, now)}"
            for p in self.policies
            if not isinstance(p, EveryNHours)
        )

    def __str__(self) -> str:
        return f"Any({', '.join(map(str, self.policies))})"


def tf_policy(
    max_to_keep: int | None, keep_checkpoint_every_n_hours: float | None
) -> Policy | None:
    """TensorFlow's pair as a policy: None (keep everything, sweep nothing) for
    ``max_to_keep=None``; ``LatestN(n)``, with ``EveryNHours(h)`` if ``h`` is truthy."""
    RetentionPolicy(max_to_keep, keep_checkpoint_every_n_hours)  # TF's validation
    if max_to_keep is None:
        return None
    if keep_checkpoint_every_n_hours:
        return Any(LatestN(max_to_keep), EveryNHours(keep_checkpoint_every_n_hours))
    return LatestN(max_to_keep)


@dataclass(frozen=True)
class Plan:
    """A sweep's decision, with a reason for every checkpoint (by path)."""

    decision: RetentionDecision
    reasons: Mapping[str, str]


LATEST_REASON = "the latest checkpoint: always kept"


def decide(
    candidates: Sequence[Candidate],
    last_preserved_timestamp: float,
    policy: Policy | None,
    *,
    now: float,
    latest: str | None = None,
    explain: bool = False,
) -> Plan:
    """Sweep ``candidates`` (the tracked checkpoints, oldest first) with ``policy``.

    Kept: what the policy keeps, and ``latest`` (the latest committed checkpoint) always.
    The rest leave the tracked list oldest first, preserved or deleted as described above.
    ``policy=None`` keeps everything and leaves ``last_preserved_timestamp`` unchanged
    (TensorFlow's ``max_to_keep=None``). Only candidates are ever deleted. Reasons for the
    checkpoints that go are worked out only with ``explain``.

    Raises:
        ValueError: if a path is tracked twice.
    """
    paths = [c.path for c in candidates]
    if len(set(paths)) != len(paths):
        raise ValueError("a checkpoint path is tracked more than once")
    if policy is None:
        reasons = dict.fromkeys(paths, "no retention policy: every tracked checkpoint is kept")
        tracked = tuple(c.tracked for c in candidates)
        return Plan(RetentionDecision(tracked, (), (), last_preserved_timestamp), reasons)
    kept = policy.keep(candidates, now)
    if latest is not None and latest in kept:
        kept[latest] = f"{LATEST_REASON}; {kept[latest]}"
    elif latest is not None and latest in set(paths):
        kept[latest] = LATEST_REASON
    hours = policy.preserve_hours
    last = last_preserved_timestamp
    keep: list[Tracked] = []
    preserve: list[Tracked] = []
    delete: list[Tracked] = []
    reasons = {}
    for c in candidates:
        if c.path in kept:
            keep.append(c.tracked)
            reasons[c.path] = kept[c.path]
            continue
        why = policy.why_not(c, candidates, now) if explain else ""
        if hours and c.timestamp - hours * _SECONDS_PER_HOUR >= last:
            preserve.append(c.tracked)
            reasons[c.path] = (
                f"{why}; EveryNHours({hours:g}): at least {hours:g} h after the last preserved "
                "checkpoint: kept forever, no longer tracked"
            )
            last = c.timestamp
        else:
            delete.append(c.tracked)
            if explain and hours:
                why = (
                    f"{why}; EveryNHours({hours:g}): less than {hours:g} h after the last preserved"
                )
            reasons[c.path] = why
    decision = RetentionDecision(tuple(keep), tuple(preserve), tuple(delete), last)
    return Plan(decision, reasons)
