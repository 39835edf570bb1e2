"""Orbax (orbax-checkpoint on JAX's CPU backend), in .venv-bench/orbax: StandardCheckpointer
(OCDBT/Zarr through TensorStore). The tree is the state nested on ``/``. Orbax has no string
arrays: the mixed workload's strings are left out. Its save is asynchronous by design:
``async_save`` is the time ``save()`` blocks, ``save`` waits for it to finish."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import orbax.checkpoint as ocp
from _harness import Context, Tool, fsync_tree, main
from workloads import State


def _path(ctx: Context) -> str:
    return os.path.join(os.path.abspath(ctx.dir), "orbax")


def nest(state: State) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in state.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(flat(value, name))
        else:
            out[name] = value
    return out


def save(ctx: Context, state: dict[str, Any], durable: bool) -> None:  # type: ignore[override]
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(_path(ctx), state)
        ckptr.wait_until_finished()
    if durable:
        fsync_tree(ctx.dir)


def async_save(ctx: Context, state: dict[str, Any]) -> dict[str, float]:  # type: ignore[override]
    with ocp.StandardCheckpointer() as ckptr:
        started = time.perf_counter()
        ckptr.save(_path(ctx), state)
        blocked = time.perf_counter() - started
        ckptr.wait_until_finished()
    fsync_tree(ctx.dir)
    return {"seconds": blocked, "total_seconds": time.perf_counter() - started}


def restore(ctx: Context) -> Mapping[str, Any]:
    with ocp.StandardCheckpointer() as ckptr:
        return flat(ckptr.restore(_path(ctx)))


TOOL = Tool(
    "orbax",
    save=save,
    restore=restore,
    async_save=async_save,
    convert=nest,
    strings=False,
    notes=f"orbax-checkpoint {ocp.__version__ if hasattr(ocp, '__version__') else '?'}; no strings",
)

if __name__ == "__main__":
    main(TOOL)
