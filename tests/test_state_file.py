"""Tests for the ``checkpoint`` state-file codec and the path safety rule."""

from __future__ import annotations

import json
import math

import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt._proto.checkpoint_state_pb2 import CheckpointState as StateProto
from anyckpt.codecs import DecodeError
from anyckpt.codecs.state_file import (
    MAX_STATE_FILE_SIZE,
    CheckpointState,
    decode_state,
    encode_state,
    relativize,
    validate_relative_path,
)
from anyckpt.errors import UnsafePathError


def fixture_bytes(case: str) -> bytes:
    path = FIXTURES / case / "checkpoint"
    return path.read_bytes()


# --- TensorFlow's own files ---------------------------------------------------------------


def test_decode_tf2_object_fixture() -> None:
    """The state file decodes to what TF's own text_format parser saw (the manifest records
    it; the timestamps are those of the run that made the fixtures)."""
    state = decode_state(fixture_bytes("tf2_object"))
    parsed = json.loads((FIXTURES / "tf2_object" / "manifest.json").read_text())
    tf_saw = parsed["state_file_parsed"]
    assert len(tf_saw["all_model_checkpoint_timestamps"]) == 3
    assert state == CheckpointState(
        model_checkpoint_path="ckpt-4",
        all_model_checkpoint_paths=("ckpt-2", "ckpt-3", "ckpt-4"),
        all_model_checkpoint_timestamps=tuple(tf_saw["all_model_checkpoint_timestamps"]),
        last_preserved_timestamp=tf_saw["last_preserved_timestamp"],
    )
    # CheckpointManager: last_preserved is set before the first save, then one per save.
    stamps = state.all_model_checkpoint_timestamps
    assert state.last_preserved_timestamp < stamps[0] < stamps[1] < stamps[2]


def test_decode_saver_fixture_has_no_timestamps() -> None:
    state = decode_state(fixture_bytes("v2_max_to_keep"))
    assert state == CheckpointState(
        model_checkpoint_path="model.ckpt-4",
        all_model_checkpoint_paths=("model.ckpt-3", "model.ckpt-4"),
    )


@pytest.mark.parametrize(
    "case",
    [
        "tf2_object",
        "v2_max_to_keep",
        "v1_sharded",
        "v1_single",
        "v2_dtypes",
        "v2_sharded",
        "v2_partitioned",
        "v2_large_entry",
    ],
)
def test_reencode_is_byte_identical_to_tensorflow(case: str) -> None:
    original = fixture_bytes(case)
    assert encode_state(decode_state(original)) == original


def test_encode_matches_documented_saver_bytes() -> None:
    state = CheckpointState("model.ckpt-4", ("model.ckpt-3", "model.ckpt-4"))
    assert encode_state(state) == (
        b'model_checkpoint_path: "model.ckpt-4"\n'
        b'all_model_checkpoint_paths: "model.ckpt-3"\n'
        b'all_model_checkpoint_paths: "model.ckpt-4"\n'
    )


def test_v1_sharded_pattern_decodes_and_is_a_safe_name() -> None:
    state = decode_state(fixture_bytes("v1_sharded"))
    assert state.model_checkpoint_path == "model.ckpt-5-?????-of-00002"
    assert validate_relative_path(state.model_checkpoint_path) == "model.ckpt-5-?????-of-00002"


def test_empty_state_encodes_to_nothing() -> None:
    assert encode_state(CheckpointState()) == b""
    assert decode_state(b"") == CheckpointState()


# --- decoding what TensorFlow's reader (text_format.Merge) accepts -------------------------


def test_decode_accepts_comments_any_order_and_list_syntax() -> None:
    text = (
        b"# written by hand\n"
        b"last_preserved_timestamp: 5\n"
        b"all_model_checkpoint_timestamps: [6, 7.5]\n"
        b"all_model_checkpoint_paths: 'a'  all_model_checkpoint_paths: \"b\"\n"
        b'model_checkpoint_path: "b"\n'
    )
    assert decode_state(text) == CheckpointState("b", ("a", "b"), (6.0, 7.5), 5.0)


def test_repeated_singular_field_last_wins_like_tensorflow() -> None:
    assert decode_state(b'model_checkpoint_path: "a"\nmodel_checkpoint_path: "b"\n') == (
        CheckpointState(model_checkpoint_path="b")
    )


def test_non_ascii_path_round_trips_as_utf8() -> None:
    state = CheckpointState("ckpt-é", ("ckpt-é",))
    data = encode_state(state)
    assert "ckpt-é".encode() in data
    assert decode_state(data) == state


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b'model_checkpoint_path: "a', id="unterminated-string"),
        pytest.param(b"model_checkpoint_path <>", id="bad-syntax"),
        pytest.param(b"unknown_field: 1\n", id="unknown-field"),
        pytest.param(b"[some.extension]: 1\n", id="extension"),
        pytest.param(b"last_preserved_timestamp: nan\n", id="nan-last-preserved"),
        pytest.param(b"last_preserved_timestamp: inf\n", id="inf-last-preserved"),
        pytest.param(b"last_preserved_timestamp: 1e999\n", id="overflow-last-preserved"),
        pytest.param(
            b'all_model_checkpoint_paths: "a"\nall_model_checkpoint_timestamps: -inf\n',
            id="inf-timestamp",
        ),
        pytest.param(
            b'all_model_checkpoint_paths: "a"\nall_model_checkpoint_timestamps: nan\n',
            id="nan-timestamp",
        ),
        pytest.param(
            b'all_model_checkpoint_paths: "a"\n'
            b"all_model_checkpoint_timestamps: 1\nall_model_checkpoint_timestamps: 2\n",
            id="more-timestamps-than-paths",
        ),
        pytest.param(
            b'all_model_checkpoint_paths: "a"\nall_model_checkpoint_paths: "b"\n'
            b"all_model_checkpoint_timestamps: 1\n",
            id="fewer-timestamps-than-paths",
        ),
        pytest.param(b"all_model_checkpoint_timestamps: 1\n", id="timestamps-without-paths"),
        pytest.param(b'model_checkpoint_path: "\\377"\n', id="escaped-invalid-utf8"),
        pytest.param(b"last_preserved_timestamp: 0x10\n", id="hex-double"),
        pytest.param(b"model_checkpoint_path: 3\n", id="number-for-string"),
        pytest.param(b'last_preserved_timestamp: "3"\n', id="string-for-double"),
        pytest.param(b"model_checkpoint_path { }\n", id="message-syntax"),
    ],
)
def test_decode_refuses_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_state(data)


def test_decode_refuses_oversized_file_before_parsing() -> None:
    # Valid text, so only the size check can refuse it.
    line = b'all_model_checkpoint_paths: "x"\n'
    data = line * (MAX_STATE_FILE_SIZE // len(line) + 1)
    assert len(data) > MAX_STATE_FILE_SIZE
    with pytest.raises(DecodeError, match="limit"):
        decode_state(data)


def test_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        decode_state(b"\x80")


def test_state_refuses_inconsistent_timestamps() -> None:
    with pytest.raises(ValueError, match="timestamps"):
        CheckpointState("a", ("a",), (1.0, 2.0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        CheckpointState("a", ("a",), (math.nan,))
    with pytest.raises(ValueError, match="last_preserved_timestamp"):
        CheckpointState(last_preserved_timestamp=math.inf)


def test_state_stores_tuples() -> None:
    state = CheckpointState("b", ["a", "b"], [1, 2], 3)  # type: ignore[arg-type]
    assert state.all_model_checkpoint_paths == ("a", "b")
    assert state.all_model_checkpoint_timestamps == (1.0, 2.0)
    assert isinstance(state.last_preserved_timestamp, float)
    assert hash(state) == hash(CheckpointState("b", ("a", "b"), (1.0, 2.0), 3.0))


def test_encode_refuses_unencodable_path() -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode_state(CheckpointState("\ud800"))


# --- properties ----------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
# Any text the protobuf runtime can hold: no lone surrogates.
texts = st.text(st.characters(codec="utf-8"), max_size=30)


@st.composite
def states(draw: st.DrawFn) -> CheckpointState:
    paths = draw(st.lists(texts, max_size=6))
    stamps = draw(st.lists(finite, min_size=len(paths), max_size=len(paths))) if paths else []
    if draw(st.booleans()):
        stamps = []
    return CheckpointState(draw(texts), tuple(paths), tuple(stamps), draw(finite))


@settings(max_examples=200, deadline=None)
@given(states())
def test_round_trip(state: CheckpointState) -> None:
    data = encode_state(state)
    assert decode_state(data) == state
    assert encode_state(decode_state(data)) == data


@settings(max_examples=150, deadline=None)
@given(states())
def test_encode_is_what_text_format_writes_and_reads(state: CheckpointState) -> None:
    proto = StateProto(
        model_checkpoint_path=state.model_checkpoint_path,
        all_model_checkpoint_paths=state.all_model_checkpoint_paths,
        all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )
    data = encode_state(state)
    assert data == text_format.MessageToString(proto).encode()
    parsed = StateProto()
    text_format.Merge(data.decode(), parsed)
    assert parsed == proto


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_only_raises_decode_error(data: bytes) -> None:
    try:
        state = decode_state(data)
    except DecodeError:
        return
    assert isinstance(state, CheckpointState)


field_names = st.sampled_from(
    [
        "model_checkpoint_path",
        "all_model_checkpoint_paths",
        "all_model_checkpoint_timestamps",
        "last_preserved_timestamp",
        "bogus",
    ]
)
values = st.one_of(
    texts.map(lambda s: '"' + s + '"'),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "0x1", "[1, 2]", "[]", "{", "<", "'a' 'b'"]),
    finite.map(repr),
    st.integers().map(str),
    texts,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(field_names, st.sampled_from([": ", ":", " ", ""]), values), max_size=8))
def test_decode_structured_garbage_only_raises_decode_error(
    lines: list[tuple[str, str, str]],
) -> None:
    data = "\n".join(f"{name}{sep}{value}" for name, sep, value in lines).encode()
    try:
        state = decode_state(data)
    except DecodeError:
        return
    assert all(math.isfinite(t) for t in state.all_model_checkpoint_timestamps)
    assert math.isfinite(state.last_preserved_timestamp)
    assert len(state.all_model_checkpoint_timestamps) in (0, len(state.all_model_checkpoint_paths))


# --- path safety ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["ckpt-4", "model.ckpt-5-?????-of-00002", "model.ckpt-7", "ckpt-é", "a b", ".hidden", "..a"],
)
def test_plain_names_are_accepted(name: str) -> None:
    assert validate_relative_path(name) == name
    assert relativize(name, "/any/dir") == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "/abs/ckpt-1",
        "../ckpt-1",
        "sub/ckpt-1",
        "ckpt-1/",
        "..\\ckpt-1",
        "C:\\ckpt-1",
        "C:ckpt-1",
        "gs://bucket/ckpt-1",
        "file:ckpt-1",
        "ckpt\x00-1",
    ],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        validate_relative_path(name)
    assert info.value.path == name


@pytest.mark.parametrize(
    ("path", "directory", "expected"),
    [
        ("/abs/dir/model.ckpt-3", "/abs/dir", "model.ckpt-3"),
        ("/abs/dir/model.ckpt-3", "/abs/dir/", "model.ckpt-3"),
        ("/abs/dir//model.ckpt-3", "/abs/dir", "model.ckpt-3"),
        ("/abs/dir/model.ckpt-5-?????-of-00002", "/abs/dir", "model.ckpt-5-?????-of-00002"),
        ("/model.ckpt-3", "/", "model.ckpt-3"),
        ("gs://bucket/run/ckpt-2", "gs://bucket/run", "ckpt-2"),
        ("C:\\runs\\a\\ckpt-2", "C:\\runs\\a", "ckpt-2"),
        ("ckpt-2", "/abs/dir", "ckpt-2"),
    ],
)
def test_relativize_accepts_direct_children(path: str, directory: str, expected: str) -> None:
    assert relativize(path, directory) == expected


@pytest.mark.parametrize(
    ("path", "directory"),
    [
        ("/abs/other/model.ckpt-3", "/abs/dir"),
        ("/abs/dir/sub/model.ckpt-3", "/abs/dir"),
        ("/abs/dir/../model.ckpt-3", "/abs/dir"),
        ("/abs/dir/..", "/abs/dir"),
        ("/abs/dir/", "/abs/dir"),
        ("/abs/dir/./model.ckpt-3", "/abs/dir"),
        ("/abs/dirx/model.ckpt-3", "/abs/dir"),
        ("/abs/dir\\/model.ckpt-3", "/abs/dir"),
        ("/abs/dir/a:b", "/abs/dir"),
        ("/abs/dir/a\x00b", "/abs/dir"),
        ("/model.ckpt-3", ""),
        ("abs/dir/model.ckpt-3", "/abs/dir"),
        ("", "/abs/dir"),
        ("..", "/abs/dir"),
    ],
)
def test_relativize_refuses_everything_else(path: str, directory: str) -> None:
    with pytest.raises(UnsafePathError):
        relativize(path, directory)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.sampled_from(["/abs/dir", "/abs/dir/", "gs://b/d", "/"]))
def test_relativize_result_is_always_a_plain_name(path: str, directory: str) -> None:
    try:
        name = relativize(path, directory)
    except UnsafePathError:
        return
    assert name
    assert name not in (".", "..")
    assert not any(c in name for c in "/\\:\x00")
    assert path == name or path.endswith("/" + name)
