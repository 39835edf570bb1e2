"""The command line on TF2 object-based checkpoints: ``inspect`` decodes the object graph (a
tree view, and JSON), ``convert`` leaves it out of formats TF does not read (with a note),
``diff`` says which objects differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anyckpt import sync
from anyckpt._proto.trackable_object_graph_pb2 import TrackableObjectGraph
from anyckpt.object_graph import ATTRIBUTES, OBJECT_GRAPH_KEY, OPTIMIZER_SLOT

SRC = str(Path(__file__).resolve().parents[1] / "src")
PLUGIN = str(Path(__file__).resolve().parents[1] / "plugins" / "anyckpt-safetensors" / "src")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (SRC, PLUGIN, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "anyckpt", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


SHARED = {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
TREE = {
    "model": {"dense": SHARED, "unused": {}},
    "optimizer": {
        "iterations": np.int64(3),
        "trainable": {"0": SHARED},
    },
    "v": {
        ATTRIBUTES: {"VARIABLE_VALUE": np.zeros(2, np.float32)},
        OPTIMIZER_SLOT: {"optimizer": {"m": np.ones(2, np.float32)}},
    },
    "save_counter": np.int64(1),
}


@pytest.fixture
def tf2_ckpt(tmp_path: Path) -> str:
    prefix = str(tmp_path / "ckpt-1")
    sync.save(prefix, TREE, object_graph=True)
    return prefix


def test_inspect_shows_the_object_tree(tf2_ckpt: str) -> None:
    result = cli("inspect", tf2_ckpt, "--values")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "object graph: 10 objects, 4 variables, 1 slot variables, 1 aliases" in out
    assert "      kernel  float32 [2, 3]" in out  # model/dense/kernel, indented by depth
    assert "    [slot m of optimizer]  float32 [2]" in out
    assert "alias optimizer/trainable/0 -> model/dense" in out
    assert "(2 objects without values not shown" in out  # model/unused, optimizer/trainable
    assert f"{OBJECT_GRAPH_KEY} = " not in out  # decoded, not dumped as bytes


def test_inspect_json_has_the_graph(tf2_ckpt: str) -> None:
    result = cli("--json", "inspect", tf2_ckpt, "--values")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    graph = data["object_graph"]
    kernel = graph["root"]["children"]["model"]["children"]["dense"]["children"]["kernel"]
    assert kernel["attributes"]["VARIABLE_VALUE"] == {
        "key": "model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE",
        "dtype": "float32",
        "shape": [2, 3],
    }
    assert graph["root"]["children"]["model"]["children"]["unused"] == {"node": 6}
    assert graph["aliases"] == {"optimizer/trainable/0": "model/dense"}
    slots = graph["root"]["children"]["v"]["slots"]["optimizer"]
    assert slots["m"]["key"] == "v/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"
    raw = [t for t in data["tensors"] if t["key"] == OBJECT_GRAPH_KEY]
    assert raw
    assert "values" not in raw[0]


def test_inspect_reports_a_corrupt_graph(tmp_path: Path) -> None:
    prefix = str(tmp_path / "bad")
    blob = np.empty((), object)
    graph = TrackableObjectGraph()
    graph.nodes.add().children.add(node_id=9, local_name="x")  # 1 node; a child 9
    blob[()] = graph.SerializeToString()
    sync.save(prefix, {OBJECT_GRAPH_KEY: blob, "x": np.zeros(1)})
    result = cli("inspect", prefix)
    assert result.returncode == 0, result.stderr
    assert "node 0 names child node 9, out of range" in result.stdout


def test_convert_to_safetensors_leaves_the_graph_out(tf2_ckpt: str, tmp_path: Path) -> None:
    dst = str(tmp_path / "out")
    result = cli("convert", tf2_ckpt, dst, "--format", "safetensors")
    assert result.returncode == 0, result.stderr
    assert f"note: left out {OBJECT_GRAPH_KEY}" in result.stdout
    back = sync.load(dst + ".safetensors")
    assert OBJECT_GRAPH_KEY not in back
    assert (
        back["model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"].tolist() == SHARED["kernel"].tolist()
    )
    kept = str(tmp_path / "kept")
    assert cli("convert", tf2_ckpt, kept).returncode == 0  # v2: TF reads it, the graph stays
    assert sync.read_tree(kept)["optimizer"]["iterations"] == 3


def test_diff_names_the_objects(tf2_ckpt: str, tmp_path: Path) -> None:
    other = str(tmp_path / "other")
    changed = {**TREE, "extra": {"w": np.zeros(1)}}
    sync.save(other, changed, object_graph=True)
    result = cli("diff", tf2_ckpt, other)
    assert result.returncode == 1
    assert "objects only in B: extra, extra/w" in result.stdout
    same = cli("diff", tf2_ckpt, tf2_ckpt)
    assert same.returncode == 0, same.stdout
