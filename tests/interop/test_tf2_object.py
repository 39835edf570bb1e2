"""TF2 object-based checkpoints with real TensorFlow 2.21, both ways (TF in a subprocess, from
the TF venv, via tf2_check.py): TF restores anyckpt-written object graphs with
``assert_consumed()``; anyckpt reads, edits and rewrites TF-written ones (a Keras model with
Adam, ``tf.Module`` trees with escaped names and a cycle, legacy optimizer slot variables),
byte-identically when unchanged; ``tf.train.CheckpointManager`` continues anyckpt's manager.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from oracle_client import REPO_ROOT, find_tf_python

from anyckpt import sync
from anyckpt.object_graph import ATTRIBUTES, OPTIMIZER_SLOT, ObjectTree

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).with_name("tf2_check.py")
DATA = ".data-00000-of-00001"


def tf2(*args: str) -> dict[str, Any]:
    """Run one tf2_check.py command in the TF venv; its JSON, or fail with TF's error."""
    python, source = find_tf_python()
    if not python.is_file():
        pytest.fail(f"TensorFlow interop needs {python} (from {source})", pytrace=False)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.run(
        [str(python), str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise AssertionError(f"tf2_check {args[0]}: no JSON\n{proc.stderr[-3000:]}") from None
    assert "error" not in result, f"TF: {result['error']}\n{proc.stderr[-3000:]}"
    return result


def leaves(tree: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, array) of every value of a tree, slots and attributes included."""
    for name, value in tree.items():
        here = f"{path}/{name}" if path else name
        if isinstance(value, Mapping):
            yield from leaves(value, here)
        else:
            yield here, value


def bits(array: Any) -> bytes:
    a = np.asarray(array)
    return a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()


def assert_same_values(got: Mapping[str, Any], want: Mapping[str, Any], skip=()) -> None:
    g = {p: bits(v) for p, v in leaves(got) if p not in skip}
    w = {p: bits(v) for p, v in leaves(want) if p not in skip}
    assert g.keys() == w.keys()
    bad = [p for p in g if g[p] != w[p]]
    assert not bad, f"values differ at {bad}"


def edited(tree: Any, salt: float) -> Any:
    """A deep copy of ``tree`` with every float value changed (odd bits included)."""
    if isinstance(tree, Mapping):
        out = (
            ObjectTree(aliases=tree.aliases, graph=tree.graph)
            if isinstance(tree, ObjectTree)
            else {}
        )
        for name, value in tree.items():
            out[name] = edited(value, salt)
        return out
    a = np.asarray(tree)
    if a.dtype.kind == "f":
        return (a * 3 + salt).astype(a.dtype)
    if a.dtype.kind == "i":
        return a + 5
    return a


SPEC_TREE: dict[str, Any] = {
    # tf.train.Checkpoint.restore creates save_counter; assert_consumed then wants its value.
    "save_counter": np.int64(4),
    "v": np.array([0.5, -0.0, np.inf, 3.25], np.float32),
    "nested": {
        "w": np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
        "steps": np.array([-(2**63), 2**63 - 1], np.int64),
        "a/b.c": np.array(1.5, ml_dtypes.bfloat16),
        "deeper": {"x": np.array([1, -2], np.int8), "..": np.array([True, False])},
    },
}


def spec_of(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: spec_of(v)
        if isinstance(v, Mapping)
        else [
            np.asarray(v).dtype.name if np.asarray(v).dtype.name != "bool" else "bool",
            list(np.shape(v)),
        ]
        for k, v in tree.items()
    }


def test_tf_checkpoint_restores_an_anyckpt_tree(tmp_path: Path) -> None:
    """(a) ``tf.train.Checkpoint(v=..., nested=Module)`` restores with assert_consumed; the
    values it restored (written back by TF) are bit-identical, and TF names every key the
    way anyckpt did."""
    ours = str(tmp_path / "ours")
    sync.save(ours, SPEC_TREE, object_graph=True)
    theirs = str(tmp_path / "theirs")
    spec = spec_of({k: v for k, v in SPEC_TREE.items() if k != "save_counter"})
    tf2("module-restore", ours, json.dumps(spec), theirs)
    back = sync.read_tree(theirs)
    assert_same_values(back, SPEC_TREE)
    our_keys = set(sync.load(ours))
    assert our_keys == set(sync.load(theirs))
    assert "nested/a.Sb..c/.ATTRIBUTES/VARIABLE_VALUE" in our_keys
    assert "nested/deeper/..../.ATTRIBUTES/VARIABLE_VALUE" in our_keys


def test_keras_model_and_adam_read_edit_write(tmp_path: Path) -> None:
    """(b) A Keras model + Adam saved by TF: read as a tree, every value changed, written back;
    TF restores weights and optimizer state with assert_consumed, bit-identically."""
    source = str(tmp_path / "keras")
    source = tf2("keras-save", source)["written"]
    tree = sync.read_tree(source)
    # Keras 3 keeps Adam's moments as optimizer variables and reaches the model's weights
    # through the optimizer too: shared objects appear once, their other paths are aliases.
    assert tree["optimizer"]["_iterations"] == 1
    assert tree.aliases["model/optimizer"] == "optimizer"
    assert any(a.startswith("model/") and a.endswith("/_kernel") for a in tree.aliases)
    assert set(tree["optimizer"]["_variables"]) >= {"2", "3", "9"}
    changed = edited(tree, 0.25)
    ours = str(tmp_path / "ours")
    sync.save(ours, changed, object_graph=True)
    theirs = str(tmp_path / "theirs")
    tf2("keras-restore", ours, theirs)
    assert_same_values(sync.read_tree(theirs), changed)
    assert not np.array_equal(
        changed["optimizer"]["_variables"]["2"], tree["optimizer"]["_variables"]["2"]
    )


def test_slot_variables_are_attached_and_restore(tmp_path: Path) -> None:
    """Legacy optimizers save slot variables (``v/.OPTIMIZER_SLOT/opt/m``): they read as the
    variable's ``.OPTIMIZER_SLOT``; a tree rebuilt by hand (no TF graph reused) with changed
    slots restores them with assert_consumed."""
    source = str(tmp_path / "slots")
    source = tf2("slots-save", source)["written"]
    tree = sync.read_tree(source)
    assert set(tree["v"]) == {ATTRIBUTES, OPTIMIZER_SLOT}
    assert set(tree["v"][OPTIMIZER_SLOT]["opt"]) == {"m", "v"}
    plain = {
        "v": {
            ATTRIBUTES: {"VARIABLE_VALUE": np.array([9.0, 8.0, 7.0], np.float32)},
            OPTIMIZER_SLOT: {
                "opt": {
                    "m": np.array([0.5, 0.25, 0.125], np.float32),
                    "v": np.array([1e-3, 2e-3, 3e-3], np.float32),
                }
            },
        },
        "opt": {k: np.float32(v + 0.5) for k, v in tree["opt"].items()},
        "save_counter": np.int64(1),
    }
    ours = str(tmp_path / "ours")
    sync.save(ours, plain, object_graph=True)
    theirs = str(tmp_path / "theirs")
    result = tf2("slots-restore", ours, theirs)
    assert result["m"] == [0.5, 0.25, 0.125]
    assert_same_values(sync.read_tree(theirs), plain)


@pytest.mark.parametrize("case", ["keras", "module", "cycle", "slots"])
def test_unchanged_rewrite_is_byte_identical(tmp_path: Path, case: str) -> None:
    """(d) A TF-written checkpoint read as a tree and saved unchanged: the same bytes, index,
    data file and object graph included (TF2 lays the data file out in node order)."""
    source = str(tmp_path / "tf")
    command = {
        "keras": ["keras-save"],
        "module": ["module-save"],
        "cycle": ["module-save"],
        "slots": ["slots-save"],
    }[case]
    source = tf2(*command, source, *(["--cycle"] if case == "cycle" else []))["written"]
    tree = sync.read_tree(source)
    if case == "cycle":
        assert tree.aliases == {"nested/inner/parent": "nested"}
    if case == "module":
        assert tree["nested"]["inner"]["a/b.c"].tolist() == [7, 8, 9]
    ours = str(tmp_path / "ours")
    sync.save(ours, tree, object_graph=True)
    for suffix in (".index", DATA):
        assert Path(ours + suffix).read_bytes() == Path(source + suffix).read_bytes(), suffix


def test_tf_manager_continues_an_anyckpt_manager_directory(tmp_path: Path) -> None:
    """(c) anyckpt's manager writes ckpt-1..3 with object graphs (and save_counter = step);
    TF's CheckpointManager restores ckpt-3 with assert_consumed and saves ckpt-4."""
    with sync.CheckpointManager(tmp_path, max_to_keep=3, object_graph=True) as manager:
        for step in (1, 2, 3):
            state = {"v": np.full(3, step, np.float32), "nested": {"w": np.eye(2) * step}}
            manager.save(state, step)
    result = tf2(
        "manager-continue",
        str(tmp_path),
        json.dumps({"v": ["float32", [3]], "nested": {"w": ["float64", [2, 2]]}}),
    )
    assert result["restored"] == str(tmp_path / "ckpt-3")
    assert result["save_counter"] == 3
    assert result["saved"] == str(tmp_path / "ckpt-4")
    assert result["checkpoints"] == [str(tmp_path / f"ckpt-{i}") for i in (2, 3, 4)]
    tree = sync.read_tree(tmp_path / "ckpt-4")
    assert tree["v"].tolist() == [3.0, 3.0, 3.0]
    assert sync.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-4")
