"""Trainer state as nested structures: flattening to TF-readable names and restoring into a
template (pure: no I/O).

PyTorch states hold integer keys (``optimizer.state_dict()["state"][0]``), lists, tuples,
Python numbers and ``None``. :func:`flatten_tree` turns such a structure into the flat
``{"optimizer/state/0/exp_avg": array}`` a checkpoint stores (names TensorFlow reads) and a
JSON-able description of the structure; :func:`unflatten_tree` rebuilds it from the two;
:func:`restore_into` fills a *template* (a fresh model's and optimizer's state) with restored
arrays, checking each leaf's dtype and shape and naming the first mismatch.

Leaves: NumPy arrays and scalars, PyTorch tensors (detached, CPU only: call ``.cpu()`` on CUDA
tensors first; bfloat16 through its bits), Python ``int``/``float``/``bool``/``str``/``bytes``
(restored as the same Python type). ``None`` stores nothing and is restored as ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import CheckpointError

__all__ = ["StructureMismatchError", "flatten_tree", "restore_into", "unflatten_tree"]

_SCALARS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes"}


class StructureMismatchError(CheckpointError):
    """A restored checkpoint does not fit the template (the message names the first leaf)."""


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch  # only reached with a torch tensor in hand

    t = tensor.detach()
    if t.device.type != "cpu":
        raise TypeError(f"a {t.device.type} tensor: copy it to the host first (.cpu())")
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        bits: np.ndarray = t.contiguous().view(torch.int16).numpy()
        return bits.view(ml_dtypes.bfloat16)
    array: np.ndarray = t.numpy()
    return array


def _leaf_array(value: Any) -> np.ndarray:
    if _is_torch(value):
        return _torch_to_numpy(value)
    return np.asarray(value)


def _key_name(key: Any, where: str) -> tuple[str, Any]:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"{where or 'the state'}: keys must be str or int, got {key!r}")
    name = str(key)
    if not name or "/" in name:
        raise ValueError(f"{where or 'the state'}: key {key!r} cannot be part of a tensor name")
    return name, (key if isinstance(key, str) else {"int": key})


def flatten_tree(state: Any) -> tuple[dict[str, Any], Any]:
    """``state`` as flat ``{"a/0/b": array}`` leaves and a JSON-able description of its
    structure (for :func:`unflatten_tree`). Dict keys are str or int; lists and tuples are
    indexed from 0.

    Raises:
        TypeError: for keys that are neither str nor int, or a tensor not on the CPU.
        ValueError: for an empty key, a key holding ``/``, or two entries of one name.
    """
    flat: dict[str, Any] = {}

    def visit(node: Any, name: str) -> Any:
        if node is None:
            return {"none": True}
        if isinstance(node, Mapping):
            items = []
            for key, value in node.items():
                part, stored = _key_name(key, name)
                items.append([stored, visit(value, f"{name}/{part}" if name else part)])
            return {"dict": items}
        if isinstance(node, (list, tuple)):
            kind = "tuple" if isinstance(node, tuple) else "list"
            return {kind: [visit(v, f"{name}/{i}" if name else str(i)) for i, v in enumerate(node)]}
        if not name:
            raise TypeError("the state must be a mapping, list or tuple, not a single value")
        if name in flat:
            raise ValueError(f"two entries flatten to the same name {name!r}")
        kind = _SCALARS.get(type(node), "torch" if _is_torch(node) else "tensor")
        flat[name] = node if kind in _SCALARS.values() else _leaf_array(node)
        return {"leaf": kind}

    tree = visit(state, "")
    return flat, tree


def _python(value: Any, kind: str, name: str) -> Any:
    array = np.asarray(value)
    if array.shape != ():
        raise StructureMismatchError(f"{name!r}: a {kind} was saved, found shape {array.shape}")
    item = array.item()
    if kind == "str":
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    if kind == "bytes":
        return item if isinstance(item, bytes) else bytes(item)
    return {"bool": bool, "int": int, "float": float}[kind](item)


def unflatten_tree(tree: Any, flat: Mapping[str, Any]) -> Any:
    """Rebuild the structure :func:`flatten_tree` described from restored ``flat`` arrays
    (PyTorch tensors come back as CPU tensors, other arrays as NumPy arrays, Python scalars
    as their type).

    Raises:
        StructureMismatchError: naming the first leaf missing from ``flat``.
    """

    def build(node: Any, name: str) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            raise StructureMismatchError(f"{name!r}: not a structure description: {node!r}")
        ((kind, body),) = node.items()
        if kind == "none":
            return None
        if kind == "dict":
            out = {}
            for stored, child in body:
                key = stored["int"] if isinstance(stored, dict) else stored
                out[key] = build(child, f"{name}/{key}" if name else str(key))
            return out
        if kind in ("list", "tuple"):
            items = [build(c, f"{name}/{i}" if name else str(i)) for i, c in enumerate(body)]
            return tuple(items) if kind == "tuple" else items
        if name not in flat:
            raise StructureMismatchError(f"{name!r} is not in the checkpoint")
        if body == "torch":
            return _numpy_to_torch(np.asarray(flat[name]))
        return flat[name] if body == "tensor" else _python(flat[name], body, name)

    return build(tree, "")


def restore_into(template: Any, flat: Mapping[str, Any]) -> Any:
    """``template``'s structure filled with the restored ``flat`` arrays. Each leaf must have
    the template leaf's dtype and shape; a PyTorch leaf comes back as a new CPU tensor, a NumPy
    one as an array, a Python scalar as its type, ``None`` as ``None``. Names in ``flat`` the
    template does not hold are ignored.

    Raises:
        StructureMismatchError: naming the first leaf that is missing or does not match.
    """

    def fill(node: Any, name: str) -> Any:
        if node is None:
            return None
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                part, _ = _key_name(key, name)
                out[key] = fill(value, f"{name}/{part}" if name else part)
            cls: Any = type(node)  # an OrderedDict comes back as one
            return out if cls is dict else cls(out)
        if isinstance(node, (list, tuple)):
            items = [fill(v, f"{name}/{i}" if name else str(i)) for i, v in enumerate(node)]
            seq: Any = type(node)
            if isinstance(node, list):
                return items
            return seq(*items) if hasattr(node, "_fields") else seq(items)  # a NamedTuple
        if name not in flat:
            raise StructureMismatchError(f"{name!r} is not in the checkpoint")
        kind = _SCALARS.get(type(node))
        if kind is not None:
            return _python(flat[name], kind, name)
        want = _leaf_array(node)
        got = np.asarray(flat[name])
        if got.dtype != want.dtype:
            raise StructureMismatchError(
                f"{name!r}: the checkpoint holds {got.dtype}, the template {want.dtype}"
            )
        if got.shape != want.shape:
            raise StructureMismatchError(
                f"{name!r}: the checkpoint holds shape {got.shape}, the template {want.shape}"
            )
        if _is_torch(node):
            return _numpy_to_torch(got)
        return got

    return fill(template, "")


def _numpy_to_torch(array: np.ndarray) -> Any:
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())
