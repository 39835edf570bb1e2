"""TensorFlow 2 object-based checkpoints (``tf.train.Checkpoint``) as nested mappings.

``await read_tree(prefix)`` reads a checkpoint along its object graph;
``await anyckpt.save(prefix, tree, object_graph=True)`` writes one that
``tf.train.Checkpoint(...).restore(prefix).assert_consumed()`` accepts;
``await remap(source, dest, values, name_map)`` writes a TF2 checkpoint's tree with some
variables replaced (for example by another framework's weights). The tree's shape is described
in :mod:`anyckpt.object_graph`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .api import PathLike, read_layout, read_tree, save
from .object_graph import (
    ATTRIBUTES,
    OPTIMIZER_SLOT,
    VARIABLE_VALUE,
    ObjectTree,
    unescape_local_name,
)

__all__ = [
    "OPTIMIZER_SLOT",
    "ObjectTree",
    "read_layout",
    "read_tree",
    "remap",
    "tree_get",
    "tree_set",
]


def _walk(tree: Mapping[str, Any], path: str) -> tuple[Mapping[str, Any], str]:
    parts = path.split("/")
    here: Any = tree
    for part in parts[:-1]:
        here = here[unescape_local_name(part)]
    return here, unescape_local_name(parts[-1])


def tree_get(tree: Mapping[str, Any], path: str) -> Any:
    """The variable (its value) at an object path such as ``"model/layer-0/kernel"``.

    A path into an :attr:`ObjectTree.aliases` entry resolves to its target; a variable with
    slots gives its ``VARIABLE_VALUE``.
    """
    path = _resolve(tree, path)
    parent, name = _walk(tree, path)
    value = parent[name]
    if isinstance(value, Mapping) and ATTRIBUTES in value:
        return value[ATTRIBUTES][VARIABLE_VALUE]
    return value


def tree_set(tree: Mapping[str, Any], path: str, value: Any) -> None:
    """Replace the variable at ``path`` (as :func:`tree_get` finds it), keeping its slots."""
    path = _resolve(tree, path)
    parent, name = _walk(tree, path)
    old = parent[name]
    assert isinstance(parent, dict)
    if isinstance(old, Mapping) and ATTRIBUTES in old:
        old[ATTRIBUTES][VARIABLE_VALUE] = value
    elif isinstance(old, Mapping):
        raise KeyError(f"{path!r} is an object, not a variable")
    else:
        parent[name] = value


def _resolve(tree: Mapping[str, Any], path: str) -> str:
    aliases = getattr(tree, "aliases", {})
    for _ in range(len(aliases) + 1):
        for alias, target in aliases.items():
            if path == alias or path.startswith(alias + "/"):
                path = target + path[len(alias) :]
                break
        else:
            return path
    raise KeyError(f"aliases loop at {path!r}")


async def remap(
    source: PathLike,
    dest: PathLike,
    values: Mapping[str, Any],
    name_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
    *,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write ``dest``: the TF2 checkpoint ``source`` with variables replaced from ``values``.

    ``values`` maps another framework's names to arrays; ``name_map`` maps each of those names
    to an object path of ``source`` (a mapping or a function; ``None``: the names are paths).
    ``transform(path, array)`` may reshape or transpose each value first (a PyTorch
    ``Linear`` weight is the transpose of a Keras ``Dense`` kernel). Each new value must have
    the dtype and shape of the one it replaces; with ``strict`` every name must map to a
    variable. Everything else (optimizer state, counters, TF's object graph) is kept as is, so
    ``tf.train.Checkpoint(...).restore(dest)`` matches exactly what it matched in ``source``.
    """
    tree = await read_tree(source, storage_options=storage_options)
    for name, array in values.items():
        if name_map is None:
            path: str | None = name
        elif callable(name_map):
            path = name_map(name)
        else:
            path = name_map.get(name)
        if path is None:
            if strict:
                raise KeyError(f"{name!r} maps to no object path")
            continue
        new = np.asarray(array)
        if transform is not None:
            new = np.asarray(transform(path, new))
        old = np.asarray(tree_get(tree, path))
        if old.shape != new.shape or old.dtype != new.dtype:
            raise ValueError(
                f"{name!r} -> {path!r}: {new.dtype}{list(new.shape)} does not fit "
                f"{old.dtype}{list(old.shape)}"
            )
        tree_set(tree, path, new)
    return await save(dest, tree, object_graph=True, storage_options=storage_options)
