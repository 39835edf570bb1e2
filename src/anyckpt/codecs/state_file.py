"""TensorFlow's ``checkpoint`` state file: a text-format ``CheckpointState`` proto.

TensorFlow writes it with ``text_format.MessageToString(CheckpointState(...))``, one
``field: value`` per line in field-number order, and reads it with ``text_format.Merge``.
:func:`encode_state` produces the same bytes (with the same protobuf release), and
:func:`decode_state` accepts what TensorFlow's reader accepts, minus what a manager cannot
safely use (see its docstring).

Paths in a state file are untrusted: :func:`validate_relative_path` and :func:`relativize`
state the rule the manager applies before touching any file a state file names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf import text_format

from anyckpt._proto.checkpoint_state_pb2 import CheckpointState as _CheckpointStateProto
from anyckpt.codecs import DecodeError
from anyckpt.errors import UnsafePathError

__all__ = [
    "MAX_STATE_FILE_SIZE",
    "CheckpointState",
    "decode_state",
    "encode_state",
    "relativize",
    "validate_relative_path",
]

#: A state file larger than this is refused before parsing (16 MiB).
MAX_STATE_FILE_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointState:
    """The contents of a ``checkpoint`` state file.

    ``all_model_checkpoint_paths`` is oldest first; TensorFlow always writes
    ``model_checkpoint_path`` as its last element, but does not check that on read, and
    neither does this class. ``all_model_checkpoint_timestamps`` is either empty (files
    written by the tf.compat.v1 ``Saver``) or one Unix time per path.

    Raises:
        ValueError: if the timestamps are not finite, or their count is neither 0 nor the
            number of paths.
    """

    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0

    def __post_init__(self) -> None:
        # Accept any iterable (lists from callers), store tuples so the state is hashable.
        paths = tuple(self.all_model_checkpoint_paths)
        stamps = tuple(float(t) for t in self.all_model_checkpoint_timestamps)
        object.__setattr__(self, "all_model_checkpoint_paths", paths)
        object.__setattr__(self, "all_model_checkpoint_timestamps", stamps)
        object.__setattr__(self, "last_preserved_timestamp", float(self.last_preserved_timestamp))
        if stamps and len(stamps) != len(paths):
            raise ValueError(
                f"{len(stamps)} checkpoint timestamps for {len(paths)} checkpoint paths "
                "(expected none or one per path)"
            )
        if not all(math.isfinite(t) for t in stamps):
            raise ValueError("a checkpoint timestamp is NaN or infinite")
        if not math.isfinite(self.last_preserved_timestamp):
            raise ValueError("last_preserved_timestamp is NaN or infinite")


def encode_state(state: CheckpointState) -> bytes:
    """Encode ``state`` exactly as TensorFlow writes it (UTF-8 text, one field per line).

    Raises:
        ValueError: if a path cannot be encoded (for example a lone surrogate).
    """
    try:
        proto = _CheckpointStateProto(
            model_checkpoint_path=state.model_checkpoint_path,
            all_model_checkpoint_paths=state.all_model_checkpoint_paths,
            all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
            last_preserved_timestamp=state.last_preserved_timestamp,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot encode checkpoint state: {exc}") from exc
    text: str = text_format.MessageToString(proto)
    return text.encode("utf-8")


def decode_state(data: bytes) -> CheckpointState:
    """Decode the bytes of a ``checkpoint`` state file.

    Accepts what TensorFlow's ``get_checkpoint_state`` parses (``text_format.Merge``:
    comments, any field order, ``[a, b]`` lists, and a repeated singular field, last one
    wins). Refuses, with :class:`~anyckpt.codecs.DecodeError`: more than
    :data:`MAX_STATE_FILE_SIZE` bytes (before parsing), non-UTF-8 bytes, text-format syntax
    errors, unknown fields, NaN or infinite timestamps, and a timestamp count other than 0
    or the number of paths. An empty file decodes to an empty state (TensorFlow's reader
    would reject an empty ``model_checkpoint_path``; that is the caller's decision).
    Paths are returned as written: check them with :func:`relativize`.
    """
    if len(data) > MAX_STATE_FILE_SIZE:
        raise DecodeError(
            f"checkpoint state file is {len(data)} bytes, over the {MAX_STATE_FILE_SIZE}-byte limit"
        )
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"checkpoint state file is not UTF-8: {exc}") from exc
    proto = _CheckpointStateProto()
    try:
        text_format.Merge(text, proto)
    except (text_format.ParseError, ValueError, TypeError, OverflowError) as exc:
        # ParseError covers the syntax; the others are belt and braces against
        # surprises inside the protobuf runtime on hostile input.
        raise DecodeError(f"checkpoint state file is not a CheckpointState: {exc}") from exc
    try:
        return CheckpointState(
            model_checkpoint_path=proto.model_checkpoint_path,
            all_model_checkpoint_paths=tuple(proto.all_model_checkpoint_paths),
            all_model_checkpoint_timestamps=tuple(proto.all_model_checkpoint_timestamps),
            last_preserved_timestamp=proto.last_preserved_timestamp,
        )
    except ValueError as exc:
        raise DecodeError(f"invalid checkpoint state: {exc}") from exc


def validate_relative_path(path: str) -> str:
    """Return ``path`` if it is a plain file name inside the checkpoint directory.

    Refused with :class:`~anyckpt.errors.UnsafePathError`: the empty string, ``.`` and
    ``..``, and any name containing ``/``, ``\\``, ``:`` or NUL. That excludes absolute
    paths, traversal, URLs (``scheme://``), Windows drives (``C:``) and NTFS streams.
    Glob characters are allowed: a V1 sharded checkpoint is recorded as
    ``model.ckpt-5-?????-of-00002``.
    """
    reason = _unsafe_reason(path)
    if reason is not None:
        raise UnsafePathError(f"refusing checkpoint path {path!r}: {reason}", path=path)
    return path


def relativize(path: str, directory: str) -> str:
    """Return the plain name under which ``directory`` holds ``path``, or refuse it.

    A plain name (see :func:`validate_relative_path`) is returned as is. A path with
    separators is accepted only if its parent is exactly ``directory`` (trailing separators
    ignored, no other normalisation), as the tf.compat.v1 Saver writes with
    ``save_relative_paths=False`` (``/abs/dir/model.ckpt-3``); its last component is
    returned, and must itself be a plain name. Only the separator that ends the parent is
    stripped, so ``/abs/dir\\/x`` is not inside ``/abs/dir``. Everything else raises
    :class:`~anyckpt.errors.UnsafePathError`.
    """
    cut = max(path.rfind("/"), path.rfind("\\"))
    if cut < 0:
        return validate_relative_path(path)
    sep = path[cut]
    parent, name = path[:cut].rstrip(sep), path[cut + 1 :]
    if not directory or parent != directory.rstrip(sep):
        raise UnsafePathError(
            f"refusing checkpoint path {path!r}: it is not directly inside {directory!r}",
            path=path,
        )
    reason = _unsafe_reason(name)
    if reason is not None:
        raise UnsafePathError(f"refusing checkpoint path {path!r}: {reason}", path=path)
    return name


def _unsafe_reason(name: str) -> str | None:
    """Why ``name`` is not a plain file name, or None if it is one."""
    if not name:
        return "empty name"
    if name in (".", ".."):
        return "not a file name"
    if "\x00" in name:
        return "contains NUL"
    for sep in ("/", "\\"):
        if sep in name:
            return f"contains a {sep!r} separator"
    if ":" in name:
        return "contains ':' (URL scheme, drive or stream)"
    return None
