"""``.meta`` interop with real TensorFlow 2.21, both ways (TF runs in one subprocess, from the TF
venv, via tf_meta_check.py).

anyckpt -> TF: checkpoints saved with ``write_meta_graph=True`` (V2, V2 sharded with a
partitioned tensor, V1, V1 sharded, the manager), and ``export_meta_graph`` on a TF-written
partitioned checkpoint, are loaded with ``tf.compat.v1.train.import_meta_graph`` and
``saver.restore``: every variable must hold exactly the saved value. TF then saves again through
the imported saver; anyckpt reads that checkpoint and TF's re-exported ``.meta``.
TF -> anyckpt: a TF graph of resource variables; the fixtures' ``.meta`` files are in test_meta.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from oracle_client import FIXTURES_DIR, REPO_ROOT, find_tf_python, tensor_mismatch
from tf_oracle import read_npz

from anyckpt import sync
from anyckpt.meta import V1, V2, MetaGraphInfo
from anyckpt.partitioned import Partitioned

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).with_name("tf_meta_check.py")


def strings(*items: bytes) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


def bits(values: list[int], dtype: Any) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    return np.array(values, dtype=f"<u{width}").view(dtype)


F32 = bits([0, 0x80000000, 0x3F800000, 0x7F800000, 0x7FC00001, 0x00000001], np.float32)

#: Every dtype TF's Saver graph can restore (float8/int4 have no Assign kernel), with odd values.
ALL_DTYPES: dict[str, Any] = {
    "dtypes/float16": bits([0, 0x8000, 0x3C00, 0x7C00, 0x7E01, 0x0001], np.float16),
    "dtypes/bfloat16": bits([0, 0x8000, 0x3F80, 0x7F80, 0x7FC1, 0x0001], ml_dtypes.bfloat16),
    "dtypes/float32": F32.reshape(2, 3),
    "dtypes/float64": bits([0, 1 << 63, 0x7FF8000000000001, 1], np.float64),
    "dtypes/int8": np.array([-128, 0, 127], np.int8),
    "dtypes/int16": np.array([-32768, 1, 32767], np.int16),
    "dtypes/int32": np.arange(24, dtype=np.int32).reshape(1, 2, 3, 2, 2),
    "dtypes/int64": np.array([-(2**63), 2**63 - 1], np.int64),
    "dtypes/uint8": np.array([0, 255], np.uint8),
    "dtypes/uint16": np.array([0, 65535], np.uint16),
    "dtypes/uint32": np.array([0, 2**32 - 1], np.uint32),
    "dtypes/uint64": np.array([0, 2**64 - 1], np.uint64),
    "dtypes/bool": np.array([True, False, True]),
    "dtypes/complex64": np.array([1 + 2j, -0.0 - 1j], np.complex64),
    "dtypes/complex128": np.array([np.inf + 1j], np.complex128),
    "dtypes/string": strings(b"", b"\x00\xff not utf-8", "ünï".encode(), b"x" * 300),
    "scalar/float": np.float32(2.5),
    "scalar/string": np.array(b"just one", dtype=object),
    "zero/float": np.zeros((0, 3), np.float32),
    "zero/string": np.empty((2, 0), dtype=object),
    # Keys that are not op names: sanitized and uniquified, restored from the right key.
    "odd/with space and:colon": np.array([1], np.int32),
    "odd/ünïcødé/": np.array([2], np.int32),
    "_leading": np.array([3], np.int32),
    "w": np.array([4], np.int32),
    "w/read": np.array([5], np.int32),
    "save/x": np.array([6], np.int32),
    "bad\udcffbyte": np.array([7], np.int32),  # not UTF-8: the raw byte 0xff
}

#: What V1 can hold (no bfloat16, uint32 or uint64: FORMAT_NOTES §7).
V1_TENSORS: dict[str, Any] = {
    k: v
    for k, v in ALL_DTYPES.items()
    if not k.endswith(("bfloat16", "uint32", "uint64")) and not k.startswith("bad")
}


def partitioned() -> dict[str, Any]:
    return {
        "part/w": Partitioned.split(np.arange(40, dtype=np.float32).reshape(10, 4), 3),
        "part/cols": Partitioned.split(np.arange(14.0).reshape(2, 7), 3, axis=1),
        "part/ids": Partitioned.split(np.arange(5, dtype=np.int64), 2),
        "plain/b": np.array([1.5, -2.0], np.float64),
        "plain/s": strings(b"a", b"bc"),
    }


def parse_slice(spec: str) -> tuple[slice, ...]:
    """TF's ``"10 4 0,4:0,4"`` -> the index of that slice ('-' is a whole dimension)."""
    *_, extents = spec.split(" ")
    out = []
    for extent in extents.split(":"):
        if extent == "-":
            out.append(slice(None))
        else:
            start, length = (int(x) for x in extent.split(","))
            out.append(slice(start, start + length))
    return tuple(out)


def full_value(value: Any) -> np.ndarray:
    return np.asarray(value.view(np.ndarray) if isinstance(value, Partitioned) else value)


# -- one TF process for everything -----------------------------------------------------------


class Case:
    def __init__(
        self, name: str, tensors: Mapping[str, Any], meta: str, prefix: str, resave: bool = True
    ) -> None:
        self.name = name
        self.tensors = dict(tensors)
        self.meta = meta
        self.prefix = prefix
        self.resave = resave


def make_cases(root: Path) -> list[Case]:
    cases = []
    d = root / "v2"
    sync.save(str(d / "model"), ALL_DTYPES, write_meta_graph=True)
    cases.append(Case("v2", ALL_DTYPES, str(d / "model.meta"), str(d / "model")))

    d = root / "v2_sharded"
    tensors = {**partitioned(), "dev/s": strings(b"s")}
    devices = dict.fromkeys(("part/w", "plain/s"), "/cpu:1")
    sync.save(str(d / "model"), tensors, write_meta_graph=True, options={"devices": devices})
    cases.append(Case("v2_sharded", tensors, str(d / "model.meta"), str(d / "model")))

    d = root / "v1"
    tensors = {**V1_TENSORS, **partitioned()}
    sync.save(str(d / "model"), tensors, format="v1", write_meta_graph=True)
    cases.append(Case("v1", tensors, str(d / "model.meta"), str(d / "model")))

    d = root / "v1_sharded"
    tensors = {**partitioned(), "i8": np.array([1, 2], np.int8)}
    files = sync.save(
        str(d / "model"), tensors, format="v1", write_meta_graph=True, options={"num_shards": 2}
    )
    assert str(d / "model-00001-of-00002") in files
    cases.append(
        Case("v1_sharded", tensors, str(d / "model.meta"), str(d / "model-?????-of-00002"))
    )

    d = root / "manager"
    with sync.CheckpointManager(
        str(d), max_to_keep=2, keep_checkpoint_every_n_hours=2.0, write_meta_graph=True
    ) as manager:
        for step in (1, 2, 3):
            state = {"x": np.full(3, step, np.int64), "y": strings(b"step %d" % step)}
            manager.save(state, step=step).wait()
    cases.append(Case("manager", state, str(d / "ckpt-3.meta"), str(d / "ckpt-3"), resave=False))

    # A TF-written partitioned V2 checkpoint, string and uint partitions included, which
    # TF cannot restore whole: our graph restores it slice by slice.
    d = root / "export"
    shutil.copytree(
        FIXTURES_DIR / "v2_partitioned", d, ignore=shutil.ignore_patterns("*.meta", "expected")
    )
    prefix = str(d / "model.ckpt-1")
    meta = sync.export_meta_graph(prefix)
    cases.append(Case("export", sync.load(prefix), meta, prefix, resave=False))
    return cases


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Case], dict[str, Any]]:
    python, source = find_tf_python()
    if not python.is_file():
        pytest.fail(f"the TF venv's python {python} (from {source}) does not exist", pytrace=False)
    root = tmp_path_factory.mktemp("tf-meta")
    cases = make_cases(root)
    jobs = {
        "restore": [
            {
                "meta": c.meta,
                "prefix": c.prefix,
                "out": str(root / f"{c.name}.npz"),
                "resave": str(root / "resaved" / c.name / "model") if c.resave else None,
            }
            for c in cases
        ],
        "resource": str(root / "resource"),
    }
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [str(python), str(SCRIPT), str(root / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    tail = "\n".join(proc.stderr.splitlines()[-30:])
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"tf_meta_check.py printed no JSON (exit {proc.returncode}):\n{tail}")
    assert proc.returncode == 0, f"{result.get('error')}\n{tail}"
    for case, job, outcome in zip(cases, jobs["restore"], result["restore"], strict=True):
        outcome["values"] = dict(read_npz(job["out"]))
        outcome["case"] = case
    return cases, result


CASE_NAMES = ["v2", "v2_sharded", "v1", "v1_sharded", "manager", "export"]


def outcome_of(tf_run: tuple[list[Case], dict[str, Any]], name: str) -> dict[str, Any]:
    for outcome in tf_run[1]["restore"]:
        if outcome["case"].name == name:
            return outcome
    pytest.skip(f"case {name} not built (fixtures missing?)")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_tf_restores_exactly_the_saved_values(
    tf_run: tuple[list[Case], dict[str, Any]], name: str
) -> None:
    outcome = outcome_of(tf_run, name)
    case: Case = outcome["case"]
    info = sync.read_meta_graph(case.meta)
    ours = {v.name: v for v in info.variables}
    assert [v["name"] for v in outcome["variables"]] == list(ours)  # TF sees our variables
    for v in outcome["variables"]:
        assert v["dtype"] == ours[v["name"]].dtype_name
        assert tuple(v["shape"]) == ours[v["name"]].shape
    restored = set()
    for var_name, value in outcome["values"].items():
        var = ours[var_name]
        assert var.checkpoint_key is not None
        expected = full_value(case.tensors[var.checkpoint_key])
        if var.slice_spec:
            expected = expected[parse_slice(var.slice_spec)]
        problem = tensor_mismatch(value, expected)
        assert problem is None, f"{name}: {var_name} ({var.checkpoint_key!r}): {problem}"
        restored.add(var.checkpoint_key)
    assert restored == set(case.tensors)
    assert outcome["zero_init"], "the variables' initializers must give zeros"


def test_tf_saver_def_is_the_configuration(tf_run: tuple[list[Case], dict[str, Any]]) -> None:
    assert outcome_of(tf_run, "manager")["saver_def"] == {
        "max_to_keep": 2,
        "keep_checkpoint_every_n_hours": 2.0,
        "sharded": False,
        "version": V2,
    }
    assert outcome_of(tf_run, "v1_sharded")["saver_def"] == {
        "max_to_keep": 5,
        "keep_checkpoint_every_n_hours": 10000.0,
        "sharded": True,
        "version": V1,
    }


@pytest.mark.parametrize("name", ["v2", "v2_sharded", "v1", "v1_sharded"])
def test_tf_saves_through_our_graph(tf_run: tuple[list[Case], dict[str, Any]], name: str) -> None:
    """TF's save op from our graph writes a checkpoint anyckpt reads back identically, and
    TF's re-exported .meta keeps our variables, keys and saver."""
    outcome = outcome_of(tf_run, name)
    case: Case = outcome["case"]
    saved = outcome["saved"]
    assert saved
    if name == "v1_sharded":
        assert saved.endswith("-?????-of-00002")
    back = sync.load(saved)
    assert set(back) == set(case.tensors)
    for key, value in case.tensors.items():
        assert tensor_mismatch(back[key], full_value(value)) is None, key
    ours, theirs = sync.read_meta_graph(case.meta), sync.read_meta_graph(saved.split("-?????")[0])
    assert isinstance(theirs, MetaGraphInfo)
    assert theirs.tensorflow_version == "2.21.0"

    def table(info: MetaGraphInfo) -> set[tuple[str, str | None, str, str]]:
        return {(v.name, v.checkpoint_key, v.slice_spec, v.dtype_name) for v in info.variables}

    assert table(theirs) == table(ours)
    assert theirs.saver == ours.saver


def test_reads_tf_resource_variable_graph(tf_run: tuple[list[Case], dict[str, Any]]) -> None:
    info = sync.read_meta_graph(tf_run[1]["resource"]["prefix"])
    assert {(v.op, v.name, v.checkpoint_key, v.dtype_name, v.shape) for v in info.variables} == {
        ("VarHandleOp", "a", "res/a", "float32", (3,)),
        ("VarHandleOp", "b", "res/b", "int64", ()),
    }
    assert info.saver is not None
    assert info.saver.version == V2
