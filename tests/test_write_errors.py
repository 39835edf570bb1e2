"""A failing shard reaches the caller as its own exception, and leaves no file behind."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import anyckpt


class ShardFailFS(MemoryFileSystem):
    """``shardfail://``: memory:// whose writes of a file named like ``FAIL_ON`` hit ENOSPC."""

    protocol = "shardfail"
    store: ClassVar[dict[str, Any]] = {}  # type: ignore[misc]
    pseudo_dirs: ClassVar[list[str]] = [""]  # type: ignore[misc]
    fail_on = "data-00001-of-00002"

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode and self.fail_on in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("shardfail", ShardFailFS, clobber=True)


@pytest.mark.parametrize("fmt", ["v2", "v1"])
def test_failed_shard_raises_its_own_error_and_leaves_nothing(fmt: str) -> None:
    ShardFailFS.store.clear()
    ShardFailFS.fail_on = "data-00001-of-00002" if fmt == "v2" else "-00001-of-00002"
    tensors = {"a": np.arange(4.0), "b": np.ones(3, np.int32)}
    options = {"shard_of": lambda key: 0 if key == "a" else 1}
    with pytest.raises(OSError, match="No space left") as info:
        anyckpt.sync.save("shardfail://run/ckpt-1", tensors, format=fmt, options=options)
    assert info.value.errno == errno.ENOSPC
    assert [k for k in ShardFailFS.store if k.startswith("/run/")] == []
