"""What each atheris harness does with one input, without atheris.

The harnesses (``fuzz_*.py``) import :mod:`_harness` first, which instruments anyckpt, then run
one of these functions on every input. ``tests/reliability/test_allocation_bound.py`` replays
the committed corpus (``fuzz/corpus/HARNESS/``) through the same functions under a memory
probe, without atheris. Each function raises only anyckpt's own errors (:data:`EXPECTED`) for a
bad input (anything else is a finding) and returns the bytes of the tensors it read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import anyio
import fsspec
import numpy as np

import anyckpt
from anyckpt.codecs import DecodeError
from anyckpt.errors import CheckpointError

EXPECTED: tuple[type[BaseException], ...] = (CheckpointError, DecodeError)

_MEMORY = fsspec.filesystem("memory")
SCRATCH = "/anyckpt-fuzz"


def write_files(files: dict[str, bytes]) -> str:
    """Replace the scratch directory's files; return its memory:// URL."""
    for key in [k for k in _MEMORY.store if k.startswith(SCRATCH + "/")]:
        del _MEMORY.store[key]
    for name, data in files.items():
        _MEMORY.pipe_file(f"{SCRATCH}/{name}", data)
    return f"memory://{SCRATCH}"


def nbytes(array: np.ndarray) -> int:
    """Memory an array returned to the caller holds (object arrays: their bytes objects too)."""
    if array.dtype == object:
        import sys

        return int(array.nbytes) + sum(sys.getsizeof(v) for v in array.reshape(-1))
    return int(array.nbytes)


async def read_everything(prefix: str, fmt: str | None = None, partial: int | None = 2) -> int:
    """Open a checkpoint, spec every key, read all of it, then rows 1: of its first
    ``partial`` tensors (None: of every tensor); return the bytes of the arrays returned.
    The one copy: ``tests/hostile_cases.py`` imports it."""
    asked = 0
    async with anyckpt.open(prefix, format=fmt) as reader:
        keys = reader.keys()
        for key in keys:
            reader.spec(key)
        asked += sum(nbytes(a) for a in (await reader.read_many()).values())
        for key in keys if partial is None else keys[:partial]:
            shape = reader.spec(key).shape
            if shape and shape[0] > 1:
                asked += nbytes(await reader.read(key, index=(slice(1, shape[0]),)))
    return asked


def _read(files: dict[str, bytes], name: str, fmt: str) -> int:
    url = write_files(files)
    return int(anyio.run(read_everything, f"{url}/{name}", fmt))


# -- the targets -----------------------------------------------------------------------------


def table(data: bytes) -> int:
    """A V2 ``.index`` as a LevelDB-style table."""
    from anyckpt.codecs.table import read_table

    read_table(data)
    return 0


def split(data: bytes) -> tuple[bytes, bytes]:
    """``fuzz_v2_index`` inputs: 2 bytes little-endian N, N bytes of data file, the index."""
    size = int.from_bytes(data[:2], "little")
    return data[2 : 2 + size], data[2 + size :]


def v2_index(data: bytes) -> int:
    """A whole V2 checkpoint (index + one data file, also offered as shard 0 of 2)."""
    shard, index = split(data)
    files = {
        "ckpt.index": index,
        "ckpt.data-00000-of-00001": shard,
        "ckpt.data-00000-of-00002": shard,
    }
    return _read(files, "ckpt", "v2")


def v1(data: bytes) -> int:
    """A V1 (TensorSliceWriter) file."""
    return _read({"model.ckpt": data}, "model.ckpt", "v1")


def state_file(data: bytes) -> int:
    """A ``checkpoint`` state file and the path rule: what passes is a plain file name."""
    from anyckpt.codecs.state_file import decode_state, relativize

    state = decode_state(data)
    for path in (state.model_checkpoint_path, *state.all_model_checkpoint_paths):
        try:
            name = relativize(path, "/root/ckpts")
        except EXPECTED:
            continue
        for bad in ("/", "\\", ":", "\x00"):
            assert bad not in name, name
        assert name not in ("", ".", ".."), name
    return 0


SUFFIX = {"safetensors": ".safetensors", "zstd": ".zckpt"}


def plugins(data: bytes) -> int:
    """One byte (even: safetensors, odd: zstd), then the plugin format's file."""
    if not data:
        return 0
    fmt = "zstd" if data[0] & 1 else "safetensors"
    return _read({"model" + SUFFIX[fmt]: data[1:]}, "model", fmt)


def meta(data: bytes) -> int:
    """A ``.meta`` MetaGraphDef (binary or text): decoded, and rendered as ``anyckpt inspect``
    and ``inspect --json`` show it."""
    from anyckpt.cli._inspect import meta_lines
    from anyckpt.meta import decode_meta_graph

    info = decode_meta_graph(data)
    info.to_dict()
    meta_lines(info)
    meta_lines(info, {"w", "a/kernel"})
    return 0


def tf2_object_graph(data: bytes) -> int:
    """TF2's ``_CHECKPOINTABLE_OBJECT_GRAPH`` (a serialized TrackableObjectGraph): parsed
    within bounds, validated (ids, names, slots, depth), laid out as a tree, and the tree
    written back out, which must lay out to the same paths."""
    from anyckpt.object_graph import build_tree, decode_tree_layout, encode_tree

    layout = decode_tree_layout(data)
    values = {key: len(key) for key in layout.checkpoint_keys()}  # a stand-in value per key
    tree = build_tree(layout, values)
    again, graph = encode_tree(dict(tree), aliases=tree.aliases)
    relaid = decode_tree_layout(graph, set(again))
    paths = {n.path for n in layout.nodes.values()}
    assert {n.path for n in relaid.nodes.values()} <= paths | set(layout.aliases), "paths changed"
    return len(data)


#: Harness name -> its target.
TARGETS: dict[str, Callable[[bytes], int]] = {
    "fuzz_table": table,
    "fuzz_v2_index": v2_index,
    "fuzz_v2_checksums": v2_index,
    "fuzz_v1": v1,
    "fuzz_state_file": state_file,
    "fuzz_plugins": plugins,
    "fuzz_meta": meta,
    "fuzz_tf2_object_graph": tf2_object_graph,
}
#: Harnesses that keep checksum comparisons on (the others bypass them).
WITH_CHECKSUMS = frozenset(
    {"fuzz_v2_checksums", "fuzz_state_file", "fuzz_meta", "fuzz_tf2_object_graph"}
)


def run_one(target: Callable[[bytes], int], data: bytes) -> int:
    """``target(data)`` with anyckpt's own errors swallowed (0 bytes read)."""
    with contextlib.suppress(*EXPECTED):
        return target(data)
    return 0


class _AnyChecksum(int):
    """Equal to every checksum: the stand-in :func:`bypass_checksums` returns."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = int.__hash__


def bypass_checksums() -> None:
    """Make every checksum comparison of the readers pass. Without this, nearly every mutation
    stops at a block's or tensor's CRC and the fuzzer never reaches the parsers behind it. (The
    checks themselves are tested elsewhere: tests/test_corrupt.py flips every bit, and
    ``fuzz_v2_checksums`` fuzzes with them on.)"""
    from anyckpt.codecs import bundle, table, v1
    from anyckpt.formats import v2_reader as v2

    def anything(*args: Any, **kwargs: Any) -> int:
        return _AnyChecksum(0)

    for module, name in ((table, "mask"), (v1, "mask"), (bundle, "mask"), (v2, "masked_crc32c")):
        assert hasattr(module, name), (module, name)
        setattr(module, name, anything)
    with contextlib.suppress(ImportError):  # the zstd plugin's header and chunk checksums
        import anyckpt_zstd.codec
        import anyckpt_zstd.format

        anyckpt_zstd.codec.crc32c = anything  # type: ignore[assignment]
        anyckpt_zstd.format.crc32c = anything  # type: ignore[assignment]
