"""Step numbers: what a save may be numbered. (Which saves ``checkpoint_interval`` skips is the
save policy's: :class:`anyckpt.save_policy.IntervalSteps`, one rule for both save paths.)"""

from __future__ import annotations

import numbers

import numpy as np


def check_step(step: object) -> int:
    """``step`` as an ``int``: a Python or NumPy integer; ``TypeError`` for anything else
    (a float such as ``200.9``, a string such as ``"7"``, a bool), which ``int()`` would
    silently turn into another checkpoint's number."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}")
    return int(step)


def following(last_step: int | None) -> int:
    """The step of a save given none: the next after ``last_step`` (1 for the first)."""
    return 1 if last_step is None else last_step + 1


def check_order(step: int, last_step: int | None) -> None:
    """``ValueError`` unless ``step`` may follow ``last_step``: not negative, and after it."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if last_step is not None and step <= last_step:
        raise ValueError(f"step {step} is not after the last step {last_step}")
