"""Trainer state as nested structures: flattening to TF-readable names and restoring into a
template (pure: no I/O).

PyTorch states hold integer keys (``optimizer.state_dict()["state"][0]``), lists, tuples,
Python numbers and ``None``. :func:`flatten_tree` turns such a structure into the flat
``{"optimizer/state/0/exp_avg": array}`` a checkpoint stores (names TensorFlow reads) and a
JSON-able description of the structure; :func:`unflatten_tree` rebuilds it from the two;
:func:`restore_into` fills a *template* (a fresh model's and optimizer's state) with restored
arrays, checking each leaf's dtype and shape and naming the first mismatch.

Leaves: NumPy arrays and scalars, PyTorch tensors (detached; a CUDA tensor is copied to the
host first; bfloat16 through its bits), JAX arrays (restored into a template's JAX array with
its sharding, ``jax.device_put``), Python ``int``/``float``/``bool``/``str``/``bytes``
(restored as the same Python type). ``None`` stores nothing and is restored as ``None``. A list
or tuple of Python numbers of one type (``"params": [0, 1, 2]``, ``"betas": (0.9, 0.999)``) is
one tensor, restored as a list or tuple of that type. Dataclass and NamedTuple instances (a
flax ``struct.dataclass``, an optax state) are saved field by field, named by field
(``opt/mu``, not ``opt/1``), and restored as dicts without a template, as the class with one.

:meth:`anyckpt.CheckpointManager.save` records the description when the state needs it (it
holds a list, tuple, ``None``, a non-string key, a dataclass or a PyTorch tensor), and
``restore(structure=True)`` rebuilds it (:func:`rebuild`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import CheckpointError
from .tensors import as_named_tensor
from .to_numpy import to_numpy

__all__ = [
    "StructureMismatchError",
    "flatten_tree",
    "needs_tree",
    "nest_names",
    "rebuild",
    "restore_into",
    "unflatten_tree",
]

_SCALARS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes"}


class StructureMismatchError(CheckpointError):
    """A restored checkpoint does not fit the template (the message names the first leaf)."""


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_jax(value: Any) -> bool:
    jax = sys.modules.get("jax")  # never imported here: a JAX array was made already
    return jax is not None and isinstance(value, jax.Array)


def _leaf_array(value: Any) -> np.ndarray:
    if _is_torch(value):
        return to_numpy(value)  # detached, on the host, narrow floats through their bits
    return np.asarray(value)


def _is_dataclass(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _fields(value: Any) -> dict[str, Any]:
    """A dataclass's or NamedTuple's fields by name (stored as ``name/field``)."""
    if _is_namedtuple(value):
        return dict(zip(value._fields, value, strict=True))
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


#: A list or tuple of Python numbers of one of these types is stored as one tensor.
_NUMBER_LISTS = ({int}, {float}, {bool})


def _number_list(node: Any) -> str | None:
    """``"list"``/``"tuple"`` if ``node`` is a non-empty list or tuple of Python numbers of one
    type (ints within int64), stored as one tensor; else None."""
    if type(node) not in (list, tuple) or not node:
        return None
    kinds = set(map(type, node))
    if kinds not in _NUMBER_LISTS:
        return None
    if kinds == {int} and not all(-(2**63) <= v < 2**63 for v in node):
        return None
    return "list" if type(node) is list else "tuple"


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
        TypeError: for keys that are neither str nor int.
        ValueError: for an empty key, a key holding ``/``, or two entries of one name.
    """
    flat: dict[str, Any] = {}

    def visit(node: Any, name: str) -> Any:
        if node is None:
            return {"none": True}
        if _is_dataclass(node) or _is_namedtuple(node):
            node = _fields(node)
        numbers = _number_list(node)
        if numbers is not None and name:
            if name in flat:
                raise ValueError(f"two entries flatten to the same name {name!r}")
            flat[name] = np.asarray(node)
            return {"leaf": numbers}
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
        if kind in _SCALARS.values():
            flat[name] = node
        else:  # a dtype nothing can store is named as the flat path names it
            flat[name] = as_named_tensor(name, node) if kind == "torch" else _leaf_array(node)
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


def _number_sequence(value: Any, kind: str, name: str) -> Any:
    array = np.asarray(value)
    if array.ndim != 1 or array.dtype.kind not in "biuf":
        raise StructureMismatchError(
            f"{name!r}: a {kind} of numbers was saved, found {array.dtype} of shape {array.shape}"
        )
    items = array.tolist()
    return items if kind == "list" else tuple(items)


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
        if body in ("list", "tuple"):
            return _number_sequence(flat[name], body, name)
        if body not in ("tensor", *_SCALARS.values()):
            raise StructureMismatchError(f"{name!r}: unknown leaf kind {body!r}")
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
        if _is_dataclass(node):
            filled = {k: fill(v, f"{name}/{k}" if name else k) for k, v in _fields(node).items()}
            return dataclasses.replace(node, **filled)
        if _is_namedtuple(node):
            filled = {k: fill(v, f"{name}/{k}" if name else k) for k, v in _fields(node).items()}
            return type(node)(**filled)
        numbers = _number_list(node)
        if numbers is not None and name:
            if name not in flat:
                raise StructureMismatchError(f"{name!r} is not in the checkpoint")
            items = _number_sequence(flat[name], numbers, name)
            if len(items) != len(node):
                raise StructureMismatchError(
                    f"{name!r}: the checkpoint holds {len(items)} numbers, the template {len(node)}"
                )
            return items if isinstance(node, list) else type(node)(items)
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
            return seq(items)
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
        if _is_jax(node):  # back on the template's devices, with its sharding
            return sys.modules["jax"].device_put(got, node.sharding)
        return got

    return fill(template, "")


def _numpy_to_torch(array: np.ndarray) -> Any:
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def needs_tree(state: Any) -> bool:
    """Whether flat ``a/b/c`` names cannot give ``state`` back: it holds a list or tuple (other
    than of numbers of one type, a tensor as ever), ``None``, a key that is not a string, a
    dataclass or a PyTorch tensor. Nested mappings of string keys to arrays and numbers (the
    common case) answer False, checked per level in bulk."""
    if not isinstance(state, Mapping):
        return True  # a dataclass, a NamedTuple, a list...
    pending: list[Mapping[Any, Any]] = [state]
    while pending:
        node = pending.pop()
        kinds = set(map(type, node.values()))
        if kinds <= _PLAIN_LEAVES and set(map(type, node)) <= _STR:
            continue  # arrays and numbers under str names (no Python per entry)
        if not set(map(type, node)) <= _STR_OR_BYTES:
            return True
        for value in node.values():
            if type(value) in _PLAIN_LEAVES:
                continue
            if isinstance(value, Mapping):
                pending.append(value)
            elif (
                value is None
                or (isinstance(value, (list, tuple)) and _number_list(value) is None)
                or _is_dataclass(value)
                or _is_torch(value)
            ):
                return True
    return False


_PLAIN_LEAVES = frozenset({np.ndarray, int, float, bool, str, bytes})
_STR = frozenset({str})
_STR_OR_BYTES = frozenset({str, bytes})


def nest_names(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``a/b/c`` names as nested dicts (a checkpoint saved without a description: one
    TensorFlow wrote, or a plain state).

    Raises:
        StructureMismatchError: if a name is both a tensor and the start of another
            (``dense/kernel`` and ``dense/kernel/Adam``): restore it flat instead.
    """
    out: dict[str, Any] = {}
    for name in sorted(flat):
        node = out
        parts = name.split("/")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = "/".join(parts[: i + 1])
                raise StructureMismatchError(
                    f"{where!r} is a tensor and also the start of {name!r}: restore it flat"
                )
            node = child
        if parts[-1] in node:
            raise StructureMismatchError(
                f"{name!r} is a tensor and also the start of other names: restore it flat"
            )
        node[parts[-1]] = flat[name]
    return {name: out[name] for name in out}


def rebuild(tree: Any, flat: Mapping[str, Any], source: str) -> Any:
    """:func:`unflatten_tree` of a description read from a file (untrusted): anything wrong
    with it is a :class:`StructureMismatchError` naming ``source``."""
    try:
        return unflatten_tree(tree, flat)
    except StructureMismatchError as exc:
        raise StructureMismatchError(f"{source}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise StructureMismatchError(
            f"{source}: not a structure description ({type(exc).__name__}: {exc})"
        ) from None
