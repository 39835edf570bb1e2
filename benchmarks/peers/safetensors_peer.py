"""safetensors (torch tensors), in .venv-bench/peers. safetensors has no string tensors: the
mixed workload's strings are left out of its state (and of its byte count)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import safetensors
from _harness import Context, Tool, fsync_tree, main
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch_peer import as_numpy, to_torch


def _path(ctx: Context) -> str:
    return os.path.join(ctx.dir, "state.safetensors")


def save(ctx: Context, state: dict[str, Any], durable: bool) -> None:  # type: ignore[override]
    save_file(state, _path(ctx))
    if durable:
        fsync_tree(ctx.dir)


def restore(ctx: Context) -> Mapping[str, Any]:
    return load_file(_path(ctx))


def restore_subset(ctx: Context) -> Mapping[str, Any]:
    with safe_open(_path(ctx), framework="pt") as f:
        names = set(f.keys())
        return {k: f.get_tensor(k) for k in ctx.subset if k in names}


TOOL = Tool(
    "safetensors",
    save=save,
    restore=restore,
    restore_subset=restore_subset,
    convert=to_torch,
    as_numpy=as_numpy,
    strings=False,
    lazy=True,
    notes=f"safetensors {safetensors.__version__}; no string tensors",
)

if __name__ == "__main__":
    main(TOOL)
