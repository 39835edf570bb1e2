"""torch.save / torch.load (CPU), in .venv-bench/peers. Strings are stored as lists of bytes
(pickled); the 1% restore maps the file (``mmap=True``) and copies only the keys asked for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from _harness import Context, Tool, fsync_tree, main
from workloads import BFLOAT16, State


def _path(ctx: Context) -> str:
    return os.path.join(ctx.dir, "state.pt")


def to_torch(state: State) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if value.dtype == object:
            out[key] = value.reshape(-1).tolist()
        elif value.dtype == BFLOAT16:
            out[key] = torch.from_numpy(value.view(np.uint16)).view(torch.bfloat16)
        else:
            out[key] = torch.from_numpy(value)
    return out


def as_numpy(value: Any) -> Any:
    """A tensor's bytes as a NumPy uint8 array (NumPy has no bfloat16 to convert to)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).view(torch.uint8).numpy()
    return value


def save(ctx: Context, state: dict[str, Any], durable: bool) -> None:  # type: ignore[override]
    torch.save(state, _path(ctx))
    if durable:
        fsync_tree(ctx.dir)


def restore(ctx: Context) -> Mapping[str, Any]:
    return torch.load(_path(ctx), weights_only=True)


def restore_subset(ctx: Context) -> Mapping[str, Any]:
    sd = torch.load(_path(ctx), weights_only=True, mmap=True)
    return {k: sd[k].clone() if isinstance(sd[k], torch.Tensor) else sd[k] for k in ctx.subset}


TOOL = Tool(
    "torch.save",
    save=save,
    restore=restore,
    restore_subset=restore_subset,
    convert=to_torch,
    as_numpy=as_numpy,
    notes=f"torch {torch.__version__}",
)

if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(TOOL)
