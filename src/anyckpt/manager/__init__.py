"""The async :class:`CheckpointManager` and what it is made of.

``core`` (the manager: lifecycle, save, restore), ``pending`` (:class:`PendingSave`,
:class:`SaveEvent`), ``steps`` (step numbers), ``capture`` (the copy before ``save()``
returns), ``state`` (reading the state file), ``distributed`` (the multi-process save). The
commit protocol is described in docs/commit-protocol.md.
"""

from __future__ import annotations

from ..formats.layout import NameIndex
from .capture import capture
from .core import CheckpointManager
from .pending import PendingSave, SaveEvent
from .state import STATE_FILE, get_checkpoint_state, latest_checkpoint, read_state
from .steps import check_step

__all__ = [
    "STATE_FILE",
    "CheckpointManager",
    "NameIndex",
    "PendingSave",
    "SaveEvent",
    "capture",
    "check_step",
    "get_checkpoint_state",
    "latest_checkpoint",
    "read_state",
]
