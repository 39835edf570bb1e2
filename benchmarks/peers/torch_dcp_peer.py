"""torch.distributed.checkpoint (DCP), in .venv-bench/peers: ``dcp.save`` / ``dcp.load`` into
preallocated tensors (allocation timed) / ``dcp.async_save``, in one process (a world of one,
gloo over a file store in the checkpoint's parent directory). Strings: lists of bytes."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _harness import Context, Tool, fsync_tree, main
from torch_peer import as_numpy, to_torch

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


def _init() -> None:
    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="anyckpt-bench-dcp-")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def _id(ctx: Context) -> str:
    return os.path.join(ctx.dir, "dcp")


def save(ctx: Context, state: dict[str, Any], durable: bool) -> None:  # type: ignore[override]
    dcp.save(state, checkpoint_id=_id(ctx))
    if durable:
        fsync_tree(ctx.dir)


def _load(ctx: Context, keys: list[str]) -> Mapping[str, Any]:
    shapes, dtypes = ctx.meta["shapes"], ctx.dtypes
    state: dict[str, Any] = {}
    for key in keys:
        if dtypes[key] == "string":
            state[key] = []
        else:
            state[key] = torch.empty(shapes[key], dtype=_TORCH_DTYPES[dtypes[key]])
    dcp.load(state, checkpoint_id=_id(ctx))
    return state


def async_save(ctx: Context, state: dict[str, Any]) -> dict[str, float]:  # type: ignore[override]
    started = time.perf_counter()
    future = dcp.async_save(state, checkpoint_id=_id(ctx))
    blocked = time.perf_counter() - started
    future.result()
    fsync_tree(ctx.dir)
    return {"seconds": blocked, "total_seconds": time.perf_counter() - started}


TOOL = Tool(
    "torch.dcp",
    save=save,
    restore=lambda ctx: _load(ctx, ctx.keys),
    restore_subset=lambda ctx: _load(ctx, ctx.subset),
    async_save=async_save,
    convert=to_torch,
    as_numpy=as_numpy,
    notes=f"torch {torch.__version__} distributed.checkpoint, world of one (gloo)",
)

if __name__ == "__main__":
    _init()
    main(TOOL)
