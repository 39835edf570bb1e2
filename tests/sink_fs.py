"""``sinkmem://``: a memory:// filesystem whose checkpoint data files are counted, not kept,
and whose writers may wait at a gate or sleep before committing: a slow storage that holds no
memory of its own, to measure what the manager holds (tests/test_pending_bytes.py)."""

from __future__ import annotations

import io
import threading
import time
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.utils import stringify_path


class Slowness:
    """How a data file's commit waits: ``seconds`` of sleep, then the ``gate`` (if set)."""

    seconds = 0.0
    gate: threading.Event | None = None
    entered = threading.Semaphore(0)  # released once per data file reaching its commit


class _SinkFile(io.RawIOBase):
    def __init__(self, fs: SinkMemoryFS, path: str) -> None:
        super().__init__()
        self.fs, self.path = fs, path
        self.data_file = ".data-" in path
        self.kept = bytearray()
        self.size = 0
        self._finished = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if not self.data_file:
            self.kept += view
        return view.nbytes

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            if self.data_file:
                Slowness.entered.release()
                time.sleep(Slowness.seconds)
                if Slowness.gate is not None:
                    Slowness.gate.wait()
            MemoryFile(self.fs, self.path, bytes(self.kept)).commit()
        super().close()

    def discard(self) -> None:
        self._finished = True
        super().close()


class SinkMemoryFS(MemoryFileSystem):
    protocol = "sinkmem"
    store: ClassVar[dict[str, Any]] = {}  # type: ignore[misc]
    pseudo_dirs: ClassVar[list[str]] = [""]  # type: ignore[misc]

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = stringify_path(path).removeprefix(f"{cls.protocol}://")
        return str(super()._strip_protocol(text))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode or "x" in mode:
            return _SinkFile(self, self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("sinkmem", SinkMemoryFS, clobber=True)
