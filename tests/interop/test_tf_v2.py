"""Interop of anyckpt's V2 bundle format with real TensorFlow 2.21 (run in a subprocess).

TF subprocesses per run: one Saver process for all TF-written cases, one read process for all
anyckpt-written cases, one sharded save, one co-import.
"""

from __future__ import annotations

import filecmp
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from oracle_client import (
    ReadResult,
    TFOracle,
    assert_tensors_identical,
    tensor_mismatch,
    tf_dtype_name,
)

import anyckpt.sync

pytestmark = pytest.mark.interop

DATA = "data-00000-of-00001"


# --- test tensors -----------------------------------------------------------------------------


def _bits(bits: list[int], dtype: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An array of `dtype` with exactly these bit patterns."""
    width = np.dtype(dtype).itemsize
    arr: np.ndarray = np.array(bits, dtype=f"<u{width}").view(dtype)
    return arr.reshape(shape) if shape is not None else arr


def _strings(items: list[bytes], shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr.reshape(shape if shape is not None else (len(items),))


F32 = [0, 0x80000000, 0x3F800000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FC00001, 0xFFC12345]
F32 += [0x00000001, 0x007FFFFF, 0x7F7FFFFF, 0x7F800001]  # subnormals, max, signaling NaN
F64 = [0, 1 << 63, 0x3FF0000000000000, 0x7FF0000000000000, 0x7FF8000000000001]
F64 += [0xFFF0000000000000, 0x0000000000000001, 0x7FEFFFFFFFFFFFFF, 0x7FF4000000000000]
F16 = [0x0000, 0x8000, 0x3C00, 0x7C00, 0xFC00, 0x7E01, 0x0001, 0x7BFF]
BF16 = [0x0000, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x7F7F]
STRINGS = [
    b"",
    b"a",
    b"\x00\xff\xfe\x80 not utf-8 \xc3\x28",
    "ünïcødé ключ 名前".encode(),
    b"y" * 127,  # the varint length grows a byte at 128 and at 16384
    b"y" * 128,
    b"z" * 16384,
    bytes(range(256)) * 6,
]


def main_tensors() -> dict[str, np.ndarray]:
    """Every dtype TF checkpoints store, scalars, zero-size, rank-5, odd keys, a big tensor."""
    rng = np.random.default_rng(20240611)
    t: dict[str, np.ndarray] = {
        "dtypes/float16": _bits(F16, np.float16, (2, 4)),
        "dtypes/bfloat16": _bits(BF16, ml_dtypes.bfloat16, (4, 2)),
        "dtypes/float32": _bits(F32, np.float32, (3, 4)),
        "dtypes/float64": _bits(F64, np.float64, (9,)),
        "dtypes/complex64": _bits(F32, np.float32).view(np.complex64),  # (re, im) pairs
        "dtypes/complex128": _bits(F64[:8], np.float64).view(np.complex128).reshape(2, 2),
        "dtypes/bool": np.array([[True, False, True], [False, False, True]]),
        "dtypes/string": _strings(STRINGS, (2, 4)),
    }
    for bits in (8, 16, 32, 64):
        info = np.iinfo(f"int{bits}")
        t[f"dtypes/int{bits}"] = np.array([info.min, -1, 0, 1, info.max], dtype=f"int{bits}")
        uinfo = np.iinfo(f"uint{bits}")
        t[f"dtypes/uint{bits}"] = np.array([0, 1, 1 << (bits - 1), uinfo.max], dtype=f"uint{bits}")
    t |= {
        "scalars/float32": _bits([0x7FC00001], np.float32, ()),
        "scalars/float64": np.array(-0.0),
        "scalars/bfloat16": _bits([0xC0A0], ml_dtypes.bfloat16, ()),
        "scalars/int64": np.array(np.iinfo(np.int64).min),
        "scalars/uint8": np.array(255, dtype=np.uint8),
        "scalars/bool": np.array(True),
        "scalars/complex128": np.array(1.5 - 2j),
        "scalars/string_empty": _strings([b""], ()),
        "scalars/string_long": _strings([b"q" * 300], ()),
        "zero_size/float32": np.zeros((0, 3), dtype=np.float32),
        "zero_size/int64": np.zeros((2, 0, 4), dtype=np.int64),
        "zero_size/bool": np.zeros((0,), dtype=bool),
        "zero_size/bfloat16": np.zeros((0, 1), dtype=ml_dtypes.bfloat16),
        "zero_size/string": _strings([], (0, 2)),
        "rank5/int32": np.arange(24, dtype=np.int32).reshape(2, 3, 1, 2, 2),
        "rank5/float64": rng.standard_normal((1, 2, 1, 3, 2)),
        "large/float32": rng.standard_normal((257, 129)).astype(np.float32),
        "large/int8_odd": rng.integers(-128, 128, 70001, dtype=np.int8),
        "odd/with space": np.array([1], dtype=np.int16),
        "odd/colon:0": np.array([2.5], dtype=np.float32),
        "odd/ünïcødé/ключ/名前": np.array([3], dtype=np.int8),
        "odd/trailing/": np.array([4.0]),
        "odd/>gt.and-dash_": np.array([5], dtype=np.uint8),
        "odd/UPPER": np.array([6], dtype=np.int16),
        "odd/p": np.array([7], dtype=np.int32),
        "odd/p/": np.array([8], dtype=np.int32),
        "odd/p/q": _strings([b"pq"]),
        "odd/pa": np.array([9], dtype=np.int64),
        "odd//double": np.array([True]),
        "odd/tab\tkey": np.array([10], dtype=np.uint16),
        "odd/" + "long" * 80: np.array([11], dtype=np.uint32),
        "/leading": np.array([12], dtype=np.uint64),
        "no_slash": np.array([13], dtype=np.float16),
    }
    return t


def multiblock_tensors() -> dict[str, np.ndarray]:
    """~300 KB of index entries: more than one 256 KiB table block."""
    rng = np.random.default_rng(7)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    out: dict[str, np.ndarray] = {}
    for i in range(300):
        key = f"blk/{i:03d}/" + rng.choice(letters, 1000).tobytes().decode()
        if i % 3 == 0:
            out[key] = np.array(i * 0.25, dtype=np.float32)
        elif i % 3 == 1:
            out[key] = _strings([b"s" * (i % 7), b""])
        else:
            out[key] = np.array([i % 128, -1, 0], dtype=np.int8)
    return out


CASES: dict[str, dict[str, np.ndarray]] = {
    "main": main_tensors(),
    "multiblock": multiblock_tensors(),
    "single_scalar": {"x": np.array(1.5, dtype=np.float32)},
    "strings_only": {
        "s/a": _strings(STRINGS),
        "s/b": _strings([], (0,)),
        "s/c": _strings([b"\x00"], ()),
    },
    "zero_size_only": {"e": np.zeros((0,), dtype=np.float32)},
}


# --- checkpoints written by each side (module-scoped: one TF process each) -------------------


@pytest.fixture(scope="module")
def tf_written(tf_oracle: TFOracle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case saved by TF's graph-mode V2 Saver (one process for all)."""
    root = tmp_path_factory.mktemp("tf-written")
    prefixes = {case: root / case / "model.ckpt" for case in CASES}
    for prefix in prefixes.values():
        prefix.parent.mkdir()
    results = tf_oracle.save_v1graph([(prefixes[c], CASES[c]) for c in CASES])
    assert [r["prefix"] for r in results] == [str(p) for p in prefixes.values()]
    return prefixes


@pytest.fixture(scope="module")
def ours_written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case saved by anyckpt (format v2), one directory per case."""
    root = tmp_path_factory.mktemp("anyckpt-written")
    prefixes = {case: root / case / "model.ckpt" for case in CASES}
    for case, prefix in prefixes.items():
        prefix.parent.mkdir()
        anyckpt.sync.save(str(prefix), CASES[case], format="v2")
    return prefixes


@pytest.fixture(scope="module")
def tf_reads_ours(tf_oracle: TFOracle, ours_written: dict[str, Path]) -> dict[str, ReadResult]:
    """TF's load_checkpoint view of every anyckpt-written case (one process for all)."""
    results = tf_oracle.read_many(ours_written.values())
    return dict(zip(ours_written, results, strict=True))


# --- (a) TF reads what anyckpt writes ---------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_tf_reads_anyckpt(case: str, tf_reads_ours: dict[str, ReadResult]) -> None:
    """TF lists the same keys, dtypes and shapes and reads every tensor bit-exactly."""
    result = tf_reads_ours[case]
    expected = CASES[case]
    assert result.errors == {}
    assert result.dtypes == {k: tf_dtype_name(v) for k, v in expected.items()}
    assert result.shapes == {k: v.shape for k, v in expected.items()}
    assert_tensors_identical(result.tensors, expected)


def test_anyckpt_writes_only_index_and_data(ours_written: dict[str, Path]) -> None:
    """A V2 save leaves exactly PREFIX.index and PREFIX.data-00000-of-00001, no temp files."""
    for prefix in ours_written.values():
        assert sorted(p.name for p in prefix.parent.iterdir()) == [
            f"{prefix.name}.{DATA}",
            f"{prefix.name}.index",
        ]


# --- (b) anyckpt reads what TF writes ---------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_anyckpt_loads_tf_checkpoint(case: str, tf_written: dict[str, Path]) -> None:
    """anyckpt.sync.load of a fresh TF checkpoint equals the tensors TF was given."""
    assert_tensors_identical(anyckpt.sync.load(str(tf_written[case])), CASES[case])


def test_anyckpt_open_tf_checkpoint(tf_written: dict[str, Path]) -> None:
    """open(): keys, specs and whole or partial reads of a TF-written checkpoint."""
    expected = CASES["main"]
    with anyckpt.sync.open(str(tf_written["main"])) as reader:
        assert sorted(reader.keys()) == sorted(expected)
        for key, value in expected.items():
            spec = reader.spec(key)
            assert tuple(spec.shape) == value.shape, key
            assert np.dtype(spec.dtype) == value.dtype, key
            assert not spec.partitions, key
        some = ["dtypes/string", "scalars/bfloat16", "zero_size/string", "odd/tab\tkey"]
        assert_tensors_identical({k: reader.read(k) for k in some}, {k: expected[k] for k in some})
        big, rank5 = expected["large/float32"], expected["rank5/int32"]
        strings = expected["dtypes/string"]
        partial = {
            "rows": (reader.read("large/float32", (slice(3, 100),)), big[3:100]),
            "row": (reader.read("large/float32", 256), big[256]),
            "rank5": (reader.read("rank5/int32", (1, slice(1, 3))), rank5[1, 1:3]),
            "strings": (reader.read("dtypes/string", (slice(1, 2),)), strings[1:2]),
        }
    for name, (got, want) in partial.items():
        assert tensor_mismatch(got, want) is None, name


def test_anyckpt_loads_subset(tf_written: dict[str, Path]) -> None:
    """load(keys=...) returns exactly the requested keys."""
    keys = ["odd/p", "odd/p/", "dtypes/bfloat16", "zero_size/int64"]
    got = anyckpt.sync.load(str(tf_written["main"]), keys)
    assert_tensors_identical(got, {k: CASES["main"][k] for k in keys})


# --- (c) byte identity with TF's Saver --------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_byte_identical_to_tf_saver(
    case: str, tf_written: dict[str, Path], ours_written: dict[str, Path]
) -> None:
    """anyckpt's .index and .data files equal those TF's V1-graph Saver writes (V2 format)."""
    tf_prefix, our_prefix = tf_written[case], ours_written[case]
    for suffix in ["index", DATA]:
        theirs = Path(f"{tf_prefix}.{suffix}")
        ours = Path(f"{our_prefix}.{suffix}")
        assert filecmp.cmp(ours, theirs, shallow=False), _first_difference(ours, theirs)


def test_multiblock_case_really_has_several_blocks(tf_written: dict[str, Path]) -> None:
    """Guard for the case above: TF's index exceeds one 256 KiB block."""
    assert Path(f"{tf_written['multiblock']}.index").stat().st_size > 300_000


def _first_difference(a: Path, b: Path) -> str:
    x, y = a.read_bytes(), b.read_bytes()
    at = next(
        (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y))
    )
    return (
        f"{a.name}: {len(x)} bytes vs TF's {len(y)}; first difference at byte {at}: "
        f"{x[at : at + 16]!r} vs TF's {y[at : at + 16]!r}"
    )


# --- sharded TF checkpoints (read only: anyckpt's sharded writer comes later) -----------------

SHARDED: Mapping[str, np.ndarray] = {
    "dev0/w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "dev0/names": _strings([b"a", b"", b"\xff"]),
    "dev0/empty": np.zeros((0, 2), dtype=np.int64),
    "dev1/bf": _bits([0x3F80, 0x7FC1, 0x8000], ml_dtypes.bfloat16),
    "dev1/tags": _strings([b"t" * 200, b"u"]),
    "dev1/scalar": np.array(-7, dtype=np.int32),
    "dev1/c": np.array([1 + 2j], dtype=np.complex64),
}


def test_anyckpt_loads_tf_sharded_checkpoint(tf_oracle: TFOracle, tmp_path: Path) -> None:
    """A Saver(sharded=True) checkpoint over two CPUs: one index, two data files."""
    devices = {key: int(key.startswith("dev1/")) for key in SHARDED}
    (result,) = tf_oracle.save_v1graph(
        [(tmp_path / "model.ckpt", SHARDED)], sharded_devices=devices, global_step=3
    )
    prefix = tmp_path / "model.ckpt-3"
    assert result["files"] == [
        "model.ckpt-3.data-00000-of-00002",
        "model.ckpt-3.data-00001-of-00002",
        "model.ckpt-3.index",
        "model.ckpt-3.meta",
    ]
    assert_tensors_identical(anyckpt.sync.load(str(prefix)), SHARDED)
    with anyckpt.sync.open(str(prefix)) as reader:
        assert sorted(reader.keys()) == sorted(SHARDED)
        assert tensor_mismatch(reader.read("dev1/tags"), SHARDED["dev1/tags"]) is None
        assert tuple(reader.spec("dev0/empty").shape) == (0, 2)


# --- (d) co-import ----------------------------------------------------------------------------


def test_coimport_with_sync_api(tf_oracle: TFOracle, tmp_path: Path) -> None:
    """With TF imported first, anyckpt.sync saves what TF reads and loads what TF's SaveV2 wrote."""
    got = tf_oracle.coimport(order="tf-first", imports=["anyckpt.sync"], roundtrip_dir=tmp_path)
    assert "anyckpt.sync" in got["imported"]
    assert got["entry_roundtrip"] is True
    assert got["roundtrip"] == {"tf_reads_ours": True, "ours_reads_tf": True}
