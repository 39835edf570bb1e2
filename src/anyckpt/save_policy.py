"""Save policies: whether ``CheckpointManager.save()`` writes a checkpoint at a step (pure).

A policy answers, for a step and the time now, given the last save that was written (its step
and time, or None before the first one): write this one, or skip it. Policies hold no state and
read no clock — the manager passes both in — so their rules are stated and property-tested
without a manager. They combine with :class:`AnyOf` (or ``|``)::

    from anyckpt.save_policy import AtSteps, IntervalSeconds, IntervalSteps

    policy = IntervalSteps(1000) | IntervalSeconds(1800) | AtSteps({1})
    CheckpointManager(directory, save_policy=policy)

TensorFlow's ``checkpoint_interval=n`` is :class:`IntervalSteps` ``(n)``. A skipped save
returns a :class:`~anyckpt.PendingSave` with ``skipped=True`` and a ``reason``; the trainer
never has to count steps itself. A preemption signal (``save_on_signal=``, see
:mod:`anyckpt.preemption`) makes the next save write whatever the policy says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "AnyOf",
    "AtSteps",
    "IntervalSeconds",
    "IntervalSteps",
    "LastSave",
    "SaveDecision",
    "SavePolicy",
    "decide_save",
]


@dataclass(frozen=True)
class LastSave:
    """The last save that was written: its step and the time (clock seconds) it was taken."""

    step: int
    time: float | None = None
    """None when unknown (a manager that opened a directory has written nothing yet)."""


@dataclass(frozen=True)
class SaveDecision:
    """Whether to write, and why (shown as ``PendingSave.reason``)."""

    save: bool
    reason: str


class SavePolicy:
    """Base of the save policies: :meth:`decide` says whether ``step`` is written."""

    def decide(self, step: int, now: float, last: LastSave | None) -> SaveDecision:
        raise NotImplementedError

    def should_save(self, step: int, now: float, last: LastSave | None) -> bool:
        """``decide(...).save``."""
        return self.decide(step, now, last).save

    def parts(self) -> tuple[SavePolicy, ...]:
        return (self,)

    def __or__(self, other: SavePolicy) -> AnyOf:
        return AnyOf(self, other)


def _positive(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class IntervalSteps(SavePolicy):
    """Write a step at least ``n`` steps after the last written one (the first always):
    TensorFlow's ``checkpoint_interval`` and Orbax's ``save_interval_steps`` for steps that
    start at a multiple of ``n``."""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int):
            raise TypeError(f"IntervalSteps needs an integer number of steps, got {self.n!r}")
        _positive(self.n, "the step interval")

    def decide(self, step: int, now: float, last: LastSave | None) -> SaveDecision:
        if last is None:
            return SaveDecision(True, "the first save")
        if step >= last.step + self.n:
            return SaveDecision(True, f"{step - last.step} steps after step {last.step}")
        return SaveDecision(
            False, f"{step - last.step} steps after step {last.step} (interval {self.n})"
        )


@dataclass(frozen=True)
class IntervalSeconds(SavePolicy):
    """Write when at least ``seconds`` have passed since the last written save (the first
    always, and the first after a restart: its time is not known)."""

    seconds: float

    def __post_init__(self) -> None:
        _positive(self.seconds, "the interval in seconds")

    def decide(self, step: int, now: float, last: LastSave | None) -> SaveDecision:
        if last is None or last.time is None:
            return SaveDecision(True, "the first save of this manager")
        elapsed = now - last.time
        if elapsed >= self.seconds:
            return SaveDecision(True, f"{elapsed:.3g} s after the last save")
        return SaveDecision(
            False, f"{elapsed:.3g} s after the last save (interval {self.seconds:g} s)"
        )


@dataclass(frozen=True, init=False)
class AtSteps(SavePolicy):
    """Write exactly the listed steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        values = frozenset(steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
            raise ValueError(f"AtSteps takes non-negative integer steps, got {sorted(values)!r}")
        object.__setattr__(self, "steps", values)

    def decide(self, step: int, now: float, last: LastSave | None) -> SaveDecision:
        if step in self.steps:
            return SaveDecision(True, f"step {step} is listed")
        return SaveDecision(False, f"step {step} is not listed")


@dataclass(frozen=True, init=False)
class AnyOf(SavePolicy):
    """Write when any of the policies would (their reasons joined when none does)."""

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        flat: list[SavePolicy] = []
        for policy in policies:
            if not isinstance(policy, SavePolicy):
                raise TypeError(f"not a save policy: {policy!r}")
            flat.extend(policy.parts())
        if not flat:
            raise ValueError("AnyOf needs at least one policy")
        object.__setattr__(self, "policies", tuple(flat))

    def parts(self) -> tuple[SavePolicy, ...]:
        return self.policies

    def decide(self, step: int, now: float, last: LastSave | None) -> SaveDecision:
        reasons = []
        for policy in self.policies:
            decision = policy.decide(step, now, last)
            if decision.save:
                return decision
            reasons.append(decision.reason)
        return SaveDecision(False, "; ".join(reasons))


def decide_save(
    policy: SavePolicy | None,
    step: int,
    now: float,
    last: LastSave | None,
    *,
    forced_by: str | None = None,
) -> SaveDecision:
    """The manager's decision: a forced save (a preemption signal: ``forced_by`` names it)
    always writes; without a policy every save writes; otherwise the policy decides."""
    if forced_by is not None:
        return SaveDecision(True, f"{forced_by} received: saving regardless of the save policy")
    if policy is None:
        return SaveDecision(True, "no save policy")
    return policy.decide(step, now, last)
