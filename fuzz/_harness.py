"""What the atheris harnesses share: instrumentation, the errors an input may cause, and a
scratch memory:// directory for whole checkpoints.

Each harness feeds one kind of untrusted input to anyckpt and accepts only anyckpt's own
errors (:class:`anyckpt.CheckpointError`, and :class:`anyckpt.codecs.DecodeError` from the
sans-I/O codecs). Any other exception is a finding: atheris stops and writes the input. Hangs
and huge allocations are findings too (libFuzzer's ``-timeout`` and ``-rss_limit_mb``, set by
``run.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports(include=["anyckpt", "anyckpt_safetensors", "anyckpt_zstd"]):
    import anyckpt
    import anyckpt.api
    import anyckpt.codecs
    import anyckpt.formats
    import anyckpt.manager
    from anyckpt.codecs import DecodeError
    from anyckpt.errors import CheckpointError

    # The plugins (optional), instrumented too: loaded now rather than by the registry.
    for plugin in ("anyckpt_safetensors.format", "anyckpt_zstd.format"):
        with contextlib.suppress(ImportError):
            importlib.import_module(plugin)

import anyio
import fsspec

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


async def read_everything(prefix: str, fmt: str | None = None) -> None:
    """Open a checkpoint and read all of it, and a partial read of its first tensors."""
    async with anyckpt.open(prefix, format=fmt) as reader:
        keys = reader.keys()
        for key in keys:
            reader.spec(key)
        await reader.read_many()
        for key in keys[:2]:
            shape = reader.spec(key).shape
            if shape and shape[0] > 1:
                await reader.read(key, index=(slice(1, shape[0]),))


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
    checks themselves are tested elsewhere: tests/test_corrupt.py flips every bit.)"""
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

        anyckpt_zstd.codec.crc32c = anything
        anyckpt_zstd.format.crc32c = anything


def run_async(fn: Callable[..., Any], *args: Any) -> None:
    anyio.run(fn, *args)


def main(test_one_input: Callable[[bytes], None], *, checksums: bool = False) -> None:
    """Fuzz ``test_one_input``; ``checksums=False`` bypasses the checksum comparisons."""
    if not checksums:
        bypass_checksums()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
