"""The in-Python limits (project .venv, NumPy only): ``ndarray.tofile`` of the same bytes into
one file (page cache), a plain ``readinto`` of that file into one fresh buffer, and
``numpy.copy`` of the state (what a capture must at least do). ``dd`` runs from run.py."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from _harness import Context, Tool, fsync_tree, main
from workloads import State


def _path(ctx: Context) -> str:
    return os.path.join(ctx.dir, "state.bin")


def save(ctx: Context, state: State, durable: bool) -> None:
    with open(_path(ctx), "wb") as f:
        for array in state.values():
            if array.dtype == object:
                f.write(b"".join(array.reshape(-1).tolist()))
            else:
                array.tofile(f)
    if durable:
        fsync_tree(ctx.dir)


def restore(ctx: Context) -> Mapping[str, Any]:
    path = _path(ctx)
    buf = np.empty(os.path.getsize(path), dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        while view.nbytes:
            n = f.readinto(view)
            if not n:
                raise OSError("short read")
            view = view[n:]
    return {"all": buf}


def copy(ctx: Context, state: State) -> dict[str, float]:
    started = time.perf_counter()
    out = {key: np.copy(value) for key, value in state.items()}
    seconds = time.perf_counter() - started
    del out
    return {"seconds": seconds}


TOOL = Tool(
    "limit",
    save=save,
    restore=restore,
    async_save=copy,
    notes="save: ndarray.tofile into one file; restore: one readinto; async_save: numpy.copy",
)

if __name__ == "__main__":
    main(TOOL)
