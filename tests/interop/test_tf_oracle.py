"""Self-tests of the TF oracle harness against the golden fixtures (no anyckpt API needed)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from oracle_client import (
    OracleError,
    TFOracle,
    assert_tensors_identical,
    fixture_expected,
    tensor_mismatch,
)
from tf_oracle import read_npz, write_npz

pytestmark = pytest.mark.interop


def test_npz_codec_roundtrips_bits(tmp_path: Path) -> None:
    """The exchange format keeps dtypes, shapes, odd keys, NaN payloads and bytes exactly."""
    tensors = {
        "a/": np.array([0x7FC1, 0x8000, 0x3F80], dtype=np.uint16).view(ml_dtypes.bfloat16),
        "ключ space": np.array([b"", b"\xff\x00", b"x" * 300], dtype=object).reshape(3, 1),
        "nan": np.array([0x7FC00001, 0x80000000], dtype=np.uint32).view(np.float32),
        "empty": np.zeros((0, 2), dtype=np.complex64),
        "scalar": np.array(True),
    }
    write_npz(tmp_path / "x.npz", [*tensors.items(), ("a/", np.int8(3))])
    back = read_npz(tmp_path / "x.npz")
    assert [k for k, _ in back] == [*tensors, "a/"]
    assert_tensors_identical(dict(back[:-1]), tensors)
    assert tensor_mismatch(back[-1][1], np.array(3, dtype=np.int8)) is None
    with pytest.raises(TypeError, match="bytes"):
        write_npz(tmp_path / "y.npz", [("s", np.array(["text"], dtype=object))])


def test_tensor_mismatch_detects_differences() -> None:
    """The comparison catches -0.0 vs 0.0, other NaN payloads, dtype and string changes."""
    assert tensor_mismatch(np.float32(-0.0), np.float32(0.0)) is not None
    nan1 = np.array([0x7FC00001], dtype=np.uint32).view(np.float32)
    assert tensor_mismatch(nan1, np.array([np.nan], dtype=np.float32)) is not None
    assert tensor_mismatch(np.array([1], np.int32), np.array([1], np.int64)) is not None
    s = np.array([b"a"], dtype=object)
    assert tensor_mismatch(np.array(["a"], dtype=object), s) is not None
    assert tensor_mismatch(np.array([b"a"], dtype=object), s) is None


def test_read_matches_fixture_expected(tf_oracle: TFOracle, tf_fixtures: Path) -> None:
    """Oracle `read` of the v2_dtypes and v2_sharded fixtures equals their expected/ values."""
    dtypes, sharded = tf_oracle.read_many(
        [tf_fixtures / "v2_dtypes/model.ckpt-7", tf_fixtures / "v2_sharded/model.ckpt-3"]
    )
    for result, case, prefix in [
        (dtypes, "v2_dtypes", "model.ckpt-7"),
        (sharded, "v2_sharded", "model.ckpt-3"),
    ]:
        expected = fixture_expected(case, prefix)
        assert result.errors == {}
        assert_tensors_identical(result.tensors, expected)
        assert result.shapes == {k: v.shape for k, v in expected.items()}
    assert dtypes.dtypes["dtypes/bfloat16"] == "bfloat16"
    assert dtypes.dtypes["scalars/string"] == "string"


def test_save_v1graph_reproduces_fixture_bytes(
    tf_oracle: TFOracle, tf_fixtures: Path, tmp_path: Path
) -> None:
    """save-v1graph of the fixture's values rewrites its .index and .data byte for byte."""
    expected = fixture_expected("v2_dtypes", "model.ckpt-7")
    (result,) = tf_oracle.save_v1graph([(tmp_path / "model.ckpt", expected)], global_step=7)
    assert result["prefix"] == str(tmp_path / "model.ckpt-7")
    assert result["files"] == [
        "model.ckpt-7.data-00000-of-00001",
        "model.ckpt-7.index",
        "model.ckpt-7.meta",
    ]
    for name in ["model.ckpt-7.index", "model.ckpt-7.data-00000-of-00001"]:
        assert filecmp.cmp(tmp_path / name, tf_fixtures / "v2_dtypes" / name, shallow=False), name
    assert (tmp_path / "checkpoint").read_text() == (
        'model_checkpoint_path: "model.ckpt-7"\nall_model_checkpoint_paths: "model.ckpt-7"\n'
    )


def test_restore_partitioned_fixture(tf_oracle: TFOracle, tf_fixtures: Path) -> None:
    """`restore` assembles partitioned variables and reports TF's own refusals as errors."""
    expected = fixture_expected("v2_partitioned", "model.ckpt-1")
    w, whole_str, str_lo, str_hi, ids = tf_oracle.restore(
        tf_fixtures / "v2_partitioned/model.ckpt-1",
        ["part/w", "part/str", ["part/str", "4 0,2"], ["part/str", "4 2,2", "string"], "part/ids"],
    )
    assert tensor_mismatch(w, expected["part/w"]) is None
    assert tensor_mismatch(ids, expected["part/ids"]) is None
    assert isinstance(whole_str, str)
    assert "Dtype string not supported" in whole_str
    assert tensor_mismatch(np.concatenate([str_lo, str_hi]), expected["part/str"]) is None


def test_state_of_fixtures(tf_oracle: TFOracle, tf_fixtures: Path) -> None:
    """`state` reports TF's view of a Saver state file."""
    got = tf_oracle.state(tf_fixtures / "v2_max_to_keep")
    base = str(tf_fixtures / "v2_max_to_keep")
    assert got["latest"] == f"{base}/model.ckpt-4"
    assert got["state"]["all_model_checkpoint_paths"] == [
        f"{base}/model.ckpt-3",
        f"{base}/model.ckpt-4",
    ]
    assert got["state"]["all_model_checkpoint_timestamps"] == []


def test_manager_save_applies_max_to_keep(tf_oracle: TFOracle, tmp_path: Path) -> None:
    """`manager-save` runs a real CheckpointManager; max_to_keep=2 leaves the last two."""
    got = tf_oracle.manager_save(tmp_path, [1, 2, 5, 9], max_to_keep=2)
    assert got["saved"] == [str(tmp_path / f"ckpt-{n}") for n in [1, 2, 5, 9]]
    assert got["checkpoints"] == [str(tmp_path / "ckpt-5"), str(tmp_path / "ckpt-9")]
    assert got["latest"] == str(tmp_path / "ckpt-9")
    assert got["files"] == [
        "checkpoint",
        "ckpt-5.data-00000-of-00001",
        "ckpt-5.index",
        "ckpt-9.data-00000-of-00001",
        "ckpt-9.index",
    ]
    stamps = got["state"]["all_model_checkpoint_timestamps"]
    assert len(stamps) == 2
    assert got["state"]["last_preserved_timestamp"] < stamps[0] <= stamps[1]


@pytest.mark.parametrize("order", ["tf-first", "anyckpt-first"])
def test_coimport_protos(tf_oracle: TFOracle, order: str) -> None:
    """anyckpt's protos (package anyckpt.tf) and TF's register side by side, in either order."""
    got = tf_oracle.coimport(order=order)
    assert got["order"] == order
    assert got["tf_version"] == "2.21.0"
    assert Path(got["anyckpt_file"]).is_relative_to(Path(__file__).resolve().parents[2] / "src")
    assert "anyckpt._proto.tensor_bundle_pb2" in got["imported"]
    assert got["full_names"] == ["anyckpt.tf.BundleEntryProto", "tensorflow.BundleEntryProto"]
    assert got["entry_roundtrip"] is True
    assert got["header_roundtrip"] is True
    assert got["state_text_roundtrip"] is True


def test_oracle_errors_are_reported(tf_oracle: TFOracle, tmp_path: Path) -> None:
    """A failing TF call raises OracleError carrying TF's message."""
    with pytest.raises(OracleError, match=r"read failed: .*"):
        tf_oracle.read(tmp_path / "does-not-exist")
