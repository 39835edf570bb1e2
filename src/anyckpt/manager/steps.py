"""Step numbers: what a save may be numbered, and which saves ``checkpoint_interval`` skips."""

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
