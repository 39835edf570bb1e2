"""anyckpt: an async, pluggable-backend checkpoint manager that speaks TensorFlow's formats.

    await anyckpt.save("ckpt/model-1", {"w": w, "b": b})
    tensors = await anyckpt.load("ckpt/model-1")
    async with anyckpt.open("ckpt/model-1") as reader:
        reader.keys(); reader.spec("w"); await reader.read("w", index=(slice(0, 10),))

Blocking twins live in :mod:`anyckpt.sync`.

The public names are imported when first used (PEP 562), so ``import anyckpt`` and the
command's ``--version`` and ``--help`` do not load NumPy, fsspec and the formats.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Each public name and the module it comes from.
_ORIGINS = {
    "CheckpointError": "errors",
    "CheckpointNotFoundError": "errors",
    "ConcurrentWriterError": "errors",
    "CorruptCheckpointError": "errors",
    "InvalidOptionError": "errors",
    "RemoteUnavailableError": "errors",
    "StorageAccessError": "errors",
    "UnsafePathError": "errors",
    "UnsupportedFormatError": "errors",
    "SaveWouldBlockError": "save_control",
    "StaleSnapshotError": "staleness",
    "StructureMismatchError": "tree",
    "CheckpointFormat": "formats.base",
    "CheckpointReader": "formats.base",
    "TensorSlice": "formats.base",
    "TensorSpec": "formats.base",
    "available_formats": "formats",
    "get_format": "formats",
    "register_format": "formats",
    "CheckpointState": "codecs.state_file",
    "CheckpointManager": "manager",
    "PendingSave": "manager",
    "SaveEvent": "manager",
    "get_checkpoint_state": "manager",
    "latest_checkpoint": "manager",
    "MetaGraphInfo": "meta",
    "MetaVariable": "meta",
    "SaverConfig": "meta",
    "Partitioned": "partitioned",
    "export_meta_graph": "api",
    "load": "api",
    "open": "api",
    "open_reader": "api",
    "read_meta_graph": "api",
    "save": "api",
}

__all__ = [
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointState",
    "ConcurrentWriterError",
    "CorruptCheckpointError",
    "InvalidOptionError",
    "MetaGraphInfo",
    "MetaVariable",
    "Partitioned",
    "PendingSave",
    "RemoteUnavailableError",
    "SaveEvent",
    "SaveWouldBlockError",
    "SaverConfig",
    "StaleSnapshotError",
    "StorageAccessError",
    "StructureMismatchError",
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
    "tf2",
]

if TYPE_CHECKING:
    from . import sync, tf2
    from .api import export_meta_graph, load, open, open_reader, read_meta_graph, save
    from .codecs.state_file import CheckpointState
    from .errors import (
        CheckpointError,
        CheckpointNotFoundError,
        ConcurrentWriterError,
        CorruptCheckpointError,
        InvalidOptionError,
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
    from .save_control import SaveWouldBlockError
    from .staleness import StaleSnapshotError
    from .tree import StructureMismatchError


def __getattr__(name: str) -> Any:
    """A public name, imported on first use (then kept here); or a submodule
    (``anyckpt.storage``)."""
    origin = _ORIGINS.get(name)
    if origin is not None:
        value = getattr(importlib.import_module(f".{origin}", __name__), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the module's dunders; not the submodules loaded on the way."""
    return sorted({*__all__, *(n for n in globals() if n.startswith("__") and n.endswith("__"))})
