"""numpy.savez / numpy.load (project .venv). bfloat16 is stored as its uint16 bits (the .npy
format has no bfloat16); strings as pickled object arrays."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from _harness import Context, Tool, fsync_tree, main
from workloads import BFLOAT16, State


def _path(ctx: Context) -> str:
    return os.path.join(ctx.dir, "state.npz")


def _convert(state: State) -> State:
    return {k: v.view(np.uint16) if v.dtype == BFLOAT16 else v for k, v in state.items()}


def save(ctx: Context, state: State, durable: bool) -> None:
    np.savez(_path(ctx), **state)
    if durable:
        fsync_tree(ctx.dir)


def _load(ctx: Context, keys: list[str] | None) -> Mapping[str, Any]:
    with np.load(_path(ctx), allow_pickle=True) as z:
        return {k: z[k] for k in (z.files if keys is None else keys)}


TOOL = Tool(
    "numpy.savez",
    save=save,
    restore=lambda ctx: _load(ctx, None),
    restore_subset=lambda ctx: _load(ctx, ctx.subset),
    convert=_convert,
)

if __name__ == "__main__":
    main(TOOL)
