"""anyckpt: an async, pluggable-backend checkpoint manager that speaks TensorFlow's formats.

    await anyckpt.save("ckpt/model-1", {"w": w, "b": b})
    tensors = await anyckpt.load("ckpt/model-1")
    async with anyckpt.open("ckpt/model-1") as reader:
        reader.keys(); reader.spec("w"); await reader.read("w", index=(slice(0, 10),))

Blocking twins live in :mod:`anyckpt.sync`.
"""

from __future__ import annotations

from . import sync
from .api import export_meta_graph, load, open, open_reader, read_meta_graph, save
from .codecs.state_file import CheckpointState
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriterError,
    CorruptCheckpointError,
    RemoteUnavailableError,
    StorageAccessError,
    UnsafePathError,
    UnsupportedFormatError,
)
from .formats import available_formats, get_format, register_format
from .formats.base import CheckpointFormat, CheckpointReader, TensorSlice, TensorSpec
from .manager import (
    CheckpointManager,
    PendingSave,
    SaveEvent,
    get_checkpoint_state,
    latest_checkpoint,
)
from .meta import MetaGraphInfo, MetaVariable, SaverConfig
from .partitioned import Partitioned

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointState",
    "ConcurrentWriterError",
    "CorruptCheckpointError",
    "MetaGraphInfo",
    "MetaVariable",
    "Partitioned",
    "PendingSave",
    "RemoteUnavailableError",
    "SaveEvent",
    "SaverConfig",
    "StorageAccessError",
    "TensorSlice",
    "TensorSpec",
    "UnsafePathError",
    "UnsupportedFormatError",
    "__version__",
    "available_formats",
    "export_meta_graph",
    "get_checkpoint_state",
    "get_format",
    "latest_checkpoint",
    "load",
    "open",
    "open_reader",
    "read_meta_graph",
    "register_format",
    "save",
    "sync",
]
