"""Reading a directory's ``checkpoint`` state file (TensorFlow's ``get_checkpoint_state``,
``latest_checkpoint``)."""

from __future__ import annotations

import posixpath
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ..codecs import DecodeError
from ..codecs.state_file import (
    MAX_STATE_FILE_SIZE,
    CheckpointState,
    decode_state,
    relativize,
)
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from ..storage import Storage

STATE_FILE = "checkpoint"


async def read_state(storage: Storage, root: str) -> CheckpointState | None:
    """The parsed state file of a directory, or None if it has none."""
    path = posixpath.join(root, STATE_FILE)
    try:
        data = await anyio.to_thread.run_sync(storage.read_bytes, path)
    except CheckpointNotFoundError:
        return None
    try:
        return decode_state(data)
    except DecodeError as exc:
        raise CorruptCheckpointError(str(exc), path=storage.url(path)) from None


async def read_state_versioned(
    storage: Storage, root: str
) -> tuple[CheckpointState | None, str | None]:
    """The parsed state file and its version token; (None, None) if there is none."""
    path = posixpath.join(root, STATE_FILE)
    try:
        data, version = await anyio.to_thread.run_sync(
            lambda: storage.read_versioned(path, max_size=MAX_STATE_FILE_SIZE)
        )
    except CheckpointNotFoundError:
        return None, None
    try:
        return decode_state(data), version
    except DecodeError as exc:
        raise CorruptCheckpointError(str(exc), path=storage.url(path)) from None


async def get_checkpoint_state(
    directory: str, *, storage_options: dict[str, Any] | None = None
) -> CheckpointState | None:
    """TensorFlow's ``tf.train.get_checkpoint_state``: the directory's state, with paths
    joined onto ``directory``; None if it has no state file."""
    storage, root = await anyio.to_thread.run_sync(Storage.from_url, directory, storage_options)
    state = await read_state(storage, root)
    if state is None:
        return None
    base = str(directory).rstrip("/")

    def full(p: str) -> str:
        return f"{base}/{relativize(p, root)}"

    return CheckpointState(
        model_checkpoint_path=full(state.model_checkpoint_path)
        if state.model_checkpoint_path
        else "",
        all_model_checkpoint_paths=tuple(full(p) for p in state.all_model_checkpoint_paths),
        all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )


async def latest_checkpoint(
    directory: str, *, storage_options: dict[str, Any] | None = None
) -> str | None:
    """TensorFlow's ``tf.train.latest_checkpoint``: the newest checkpoint's prefix or None."""
    state = await get_checkpoint_state(directory, storage_options=storage_options)
    if state is None or not state.model_checkpoint_path:
        return None
    return state.model_checkpoint_path
