"""Interop of the V1 format and of sharded saves (V1 and V2) with real TensorFlow 2.21.

TF writes V1 (single and sharded) and sharded V2 checkpoints; anyckpt reads them exactly and, given
the same tensors and devices, writes the same bytes. TF reads what anyckpt writes, including
partitioned tensors and size-split shards, through ``RestoreV2`` and ``load_checkpoint``.
TF subprocesses: three saves, one restore, one read.
"""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import numpy as np
import pytest
from oracle_client import TFOracle, assert_tensors_identical, tensor_mismatch, tf_dtype_name

import anyckpt.sync
from anyckpt.partitioned import Partitioned

pytestmark = pytest.mark.interop


def _strings(items: list[bytes], shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr.reshape(shape if shape is not None else (len(items),))


def _bits(bits: list[int], dtype: object) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    return np.array(bits, dtype=f"<u{width}").view(dtype)


def v1_tensors() -> dict[str, np.ndarray]:
    """Every dtype V1 holds, scalars, zero-size, odd keys, and a varint-heavy tensor."""
    rng = np.random.default_rng(11)
    t: dict[str, np.ndarray] = {
        "f32": _bits([0, 0x80000000, 0x7F800000, 0x7FC00001, 0x00000001], np.float32),
        "f64": rng.standard_normal((3, 2)),
        "f16": _bits([0x3C00, 0x8000, 0x7C00, 0x7E01, 0x0001], np.float16),
        "c64": np.array([1 - 2j, np.inf + 0j], dtype=np.complex64),
        "c128": np.array([[0.5 + 0.25j]], dtype=np.complex128),
        "bool": np.array([[True, False], [False, True]]),
        "str": _strings([b"", b"\x00\xff", b"x" * 300]),
        "scalar/i32": np.array(-123456, dtype=np.int32),
        "scalar/str": _strings([b"s"], ()),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "ints/varints": rng.integers(-(2**31), 2**31, 5000).astype(np.int32),
        "odd/with space:0": np.array([3], dtype=np.int16),
        "odd/ünï": np.array([1], dtype=np.int8),
    }
    for bits in (8, 16, 32, 64):
        info = np.iinfo(f"int{bits}")
        t[f"ints/int{bits}"] = np.array([info.min, -1, 0, 1, info.max], dtype=f"int{bits}")
    for bits in (8, 16):
        t[f"ints/uint{bits}"] = np.array([0, 1, 2 ** (bits - 1), 2**bits - 1], f"uint{bits}")
    return t


V1 = v1_tensors()
V1_DEVICES = {key: (0 if i % 3 else 1) for i, key in enumerate(sorted(V1))}
V2_SHARDED = {
    "a/w": np.arange(24, dtype=np.float32).reshape(4, 6),
    "a/names": _strings([b"a", b"", b"\xff"]),
    "b/bf": np.arange(4, dtype=np.float32),
    "b/ids": np.arange(7, dtype=np.int64),
    "c/empty": np.zeros((0, 2), dtype=np.int64),
    "c/flag": np.array(True),
}
V2_DEVICES = {key: "abc".index(key[0]) for key in V2_SHARDED}


@pytest.fixture(scope="module")
def tf_saves(tf_oracle: TFOracle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TF's Saver: V1 unsharded, V1 sharded over two CPUs, V2 sharded over three."""
    root = tmp_path_factory.mktemp("tf-saves")
    dirs = {name: root / name for name in ("v1", "v1_sharded", "v2_sharded")}
    for d in dirs.values():
        d.mkdir()
    (single,) = tf_oracle.save_v1graph([(dirs["v1"] / "model.ckpt", V1)], version="V1")
    (sharded,) = tf_oracle.save_v1graph(
        [(dirs["v1_sharded"] / "model.ckpt", V1)],
        sharded_devices=V1_DEVICES,
        global_step=5,
        version="V1",
    )
    (v2,) = tf_oracle.save_v1graph(
        [(dirs["v2_sharded"] / "model.ckpt", V2_SHARDED)],
        sharded_devices=V2_DEVICES,
        global_step=3,
    )
    return {
        "v1": Path(single["prefix"]),
        "v1_sharded": Path(sharded["prefix"]),
        "v2_sharded": Path(v2["prefix"]),
    }


def test_anyckpt_reads_tf_v1(tf_saves: dict[str, Path]) -> None:
    assert tf_saves["v1"].is_file()
    assert_tensors_identical(anyckpt.sync.load(str(tf_saves["v1"])), V1)


def test_anyckpt_reads_tf_v1_sharded_by_pattern_and_prefix(tf_saves: dict[str, Path]) -> None:
    pattern = tf_saves["v1_sharded"]
    assert pattern.name == "model.ckpt-5-?????-of-00002"  # what TF's Saver returns
    for name in (str(pattern), str(pattern.parent / "model.ckpt-5")):
        assert_tensors_identical(anyckpt.sync.load(name), V1)
        with anyckpt.sync.open(name) as reader:
            assert [os.path.basename(f) for f in reader.files()] == [
                "model.ckpt-5-00000-of-00002",
                "model.ckpt-5-00001-of-00002",
            ]


def test_v1_writes_are_byte_identical_to_tf(tf_saves: dict[str, Path], tmp_path: Path) -> None:
    (ours,) = anyckpt.sync.save(tmp_path / "model.ckpt", V1, format="v1")
    assert filecmp.cmp(ours, tf_saves["v1"], shallow=False)
    devices = {key: f"/device:CPU:{d}" for key, d in V1_DEVICES.items()}
    written = anyckpt.sync.save(
        tmp_path / "model.ckpt-5", V1, format="v1", options={"devices": devices}
    )
    theirs = tf_saves["v1_sharded"].parent
    assert [os.path.basename(p) for p in written] == [
        "model.ckpt-5-00000-of-00002",
        "model.ckpt-5-00001-of-00002",
    ]
    for path in written:
        assert filecmp.cmp(path, theirs / os.path.basename(path), shallow=False), path


def test_v2_sharded_writes_are_byte_identical_to_tf(
    tf_saves: dict[str, Path], tmp_path: Path
) -> None:
    assert_tensors_identical(anyckpt.sync.load(str(tf_saves["v2_sharded"])), V2_SHARDED)
    devices = {key: f"/job:localhost/device:CPU:{d}" for key, d in V2_DEVICES.items()}
    written = anyckpt.sync.save(tmp_path / "model.ckpt-3", V2_SHARDED, options={"devices": devices})
    names = [os.path.basename(p) for p in written]
    assert names == [f"model.ckpt-3.data-0000{i}-of-00003" for i in range(3)] + [
        "model.ckpt-3.index"
    ]
    for path in written:
        theirs = tf_saves["v2_sharded"].parent / os.path.basename(path)
        assert filecmp.cmp(path, theirs, shallow=False), path


# --- TF reads what anyckpt writes -------------------------------------------------------------

PARTITIONED = {
    "part/rows": Partitioned.split(np.arange(40, dtype=np.float32).reshape(10, 4), 3, axis=0),
    "part/cols": Partitioned.split(np.arange(14, dtype=np.int64).reshape(2, 7), 3, axis=1),
    "part/f16": Partitioned.split(np.arange(6, dtype=np.float16), 2),
    "part/str": Partitioned.split(_strings([b"a", b"bb", b"", b"dddd"]), 2),
}


def test_tf_restores_anyckpt_v1_sharded_partitioned(tf_oracle: TFOracle, tmp_path: Path) -> None:
    tensors = {**V1, **PARTITIONED}
    devices = {key: "/gpu:1" if key.startswith("part/") else "/gpu:0" for key in tensors}
    written = anyckpt.sync.save(
        tmp_path / "ckpt-7",
        tensors,
        format="v1",
        options={"devices": devices, "max_shard_bytes": 4096},
    )
    count = len(written)
    assert count >= 3
    pattern = str(tmp_path / f"ckpt-7-?????-of-{count:05d}")
    keys = sorted(tensors)
    slices = [
        ("part/rows", "10 4 4,3:0,4", "float32"),
        ("part/cols", "2 7 -:1,5", "int64"),
    ]
    got = tf_oracle.restore(pattern, [[k, "", tf_dtype_name(tensors[k])] for k in keys] + slices)
    errors = {k: g for k, g in zip(keys, got, strict=False) if isinstance(g, str)}
    assert errors == {}
    restored = dict(zip(keys, got, strict=False))
    assert_tensors_identical(restored, {k: np.asarray(v) for k, v in tensors.items()})
    rows, cols = got[len(keys) :]
    assert tensor_mismatch(rows, np.asarray(PARTITIONED["part/rows"])[4:7]) is None
    assert tensor_mismatch(cols, np.asarray(PARTITIONED["part/cols"])[:, 1:6]) is None


def test_tf_reads_anyckpt_v2_sharded(tf_oracle: TFOracle, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    big = {f"big/{i}": rng.standard_normal(3000).astype(np.float32) for i in range(5)}
    plain_parts = {k: v for k, v in PARTITIONED.items() if k in ("part/rows", "part/cols")}
    cases = {
        "by_device": (V2_SHARDED, {"devices": lambda k: f"/cpu:{V2_DEVICES[k]}"}),
        "by_size": ({**big, **V2_SHARDED}, {"max_shard_bytes": 20_000}),
        "balanced_partitioned": ({**big, **plain_parts}, {"num_shards": 4}),
    }
    prefixes = []
    for name, (tensors, options) in cases.items():
        written = anyckpt.sync.save(tmp_path / name / "ckpt-1", tensors, options=options)
        assert len(written) > 2, name
        prefixes.append(tmp_path / name / "ckpt-1")
    for (name, (tensors, _)), result in zip(
        cases.items(), tf_oracle.read_many(prefixes), strict=True
    ):
        assert result.errors == {}, name
        assert result.shapes == {k: np.shape(v) for k, v in tensors.items()}, name
        assert_tensors_identical(result.tensors, {k: np.asarray(v) for k, v in tensors.items()})
