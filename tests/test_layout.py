"""The one home for checkpoint file names (``anyckpt.formats.layout``): parsing every
built-in format's names, and the pure ``debris`` rule the manager and the CLI share."""

from __future__ import annotations

from pathlib import Path

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt import CheckpointManager
from anyckpt.codecs.state_file import CheckpointState, encode_state
from anyckpt.formats import layout
from anyckpt.formats.layout import FileName, debris, file_name, parse_file_name
from anyckpt.formats.v1 import shard_path
from anyckpt.formats.v2_layout import data_path, index_path
from anyckpt.storage import TEMP_MARKER

_CHARS = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?")
stems = st.text(_CHARS, min_size=1, max_size=12).filter(
    lambda s: parse_file_name(s) == FileName(s, layout.PLAIN)
)


@given(
    stems,
    st.sampled_from([r for r in layout.ROLES if r not in (layout.STATE, layout.TEMP)]),
    st.integers(0, 99_999),
    st.integers(1, 99_999),
)
def test_parse_inverts_build(stem: str, role: str, shard: int, num_shards: int) -> None:
    assert parse_file_name(file_name(stem, role, shard, num_shards)) == (stem, role)


@given(stems, st.sampled_from([r for r in layout.ROLES if r not in (layout.STATE, layout.TEMP)]))
def test_temp_names_parse_to_the_file_they_become(stem: str, role: str) -> None:
    final = file_name(stem, role)
    assert parse_file_name(file_name(final, layout.TEMP)) == (final, layout.TEMP)
    assert parse_file_name(f"{final}{TEMP_MARKER}a1b2c3d4e5f60718") == (final, layout.TEMP)


@given(stems, st.integers(0, 4), st.integers(1, 5))
def test_the_formats_builders_agree(stem: str, shard: int, num_shards: int) -> None:
    assert parse_file_name(index_path(stem)) == (stem, layout.INDEX)
    assert parse_file_name(data_path(stem, shard, num_shards)) == (stem, layout.DATA)
    assert parse_file_name(shard_path(stem, shard, num_shards)) == (stem, layout.V1_SHARD)


def test_state_file_and_impossible_names() -> None:
    assert parse_file_name("checkpoint") == ("checkpoint", layout.STATE)
    assert parse_file_name(f"checkpoint{TEMP_MARKER}00ff") == ("checkpoint", layout.TEMP)
    for bad in ("", ".", "..", "a/b", f"{TEMP_MARKER}00"):
        assert parse_file_name(bad) is None


def test_drifted_cases_meta_and_temp_files_of_every_format() -> None:
    names = [
        "ckpt-5.index",
        "ckpt-5.data-00000-of-00001",
        "ckpt-5.meta",
        "ckpt-3.meta",  # its checkpoint is gone
        "ckpt-9.meta",  # newer than the latest, untracked
        f"ckpt-6-00000-of-00002{TEMP_MARKER}ab",  # a V1 shard's temp
        f"ckpt-6.zst{TEMP_MARKER}cd",  # a plugin file's temp
        f"checkpoint{TEMP_MARKER}ef",  # the state file's temp
        f"other-1.index{TEMP_MARKER}01",  # not ours
        "notes.meta",
    ]
    found = debris(names, ["ckpt-5"], checkpoint_name="ckpt", latest="ckpt-5")
    assert sorted(found) == sorted(
        [
            "ckpt-3.meta",
            "ckpt-9.meta",
            f"ckpt-6-00000-of-00002{TEMP_MARKER}ab",
            f"ckpt-6.zst{TEMP_MARKER}cd",
            f"checkpoint{TEMP_MARKER}ef",
        ]
    )


_SUFFIXES = [
    ".index",
    ".data-00000-of-00001",
    ".data-00001-of-00002",
    "-00000-of-00002",
    ".meta",
    ".metrics.json",
    ".zst",
    "",
]
_FILE = st.builds(
    lambda stem, step, suffix, temp: (
        f"{stem}-{step}{suffix}" + (f"{TEMP_MARKER}{step:04x}" if temp else "")
    ),
    st.sampled_from(["ckpt", "other"]),
    st.integers(1, 8),
    st.sampled_from(_SUFFIXES),
    st.booleans(),
)


@settings(max_examples=25, deadline=None)
@given(
    st.sets(_FILE | st.sampled_from([f"checkpoint{TEMP_MARKER}1", "notes.txt"]), max_size=14),
    st.sets(st.integers(1, 8), max_size=4),
    st.none() | st.integers(1, 8),
)
def test_debris_removes_what_the_manager_removes(
    tmp_path_factory: object, names: set[str], tracked_steps: set[int], latest: int | None
) -> None:
    directory = Path(tmp_path_factory.mktemp("d"))  # type: ignore[attr-defined]
    for name in names:
        (directory / name).write_bytes(b"x")
    tracked = [f"ckpt-{s}" for s in sorted(tracked_steps)]
    latest_name = f"ckpt-{latest}" if latest is not None else None
    if latest_name is not None:
        tracked = [t for t in tracked if t != latest_name] + [latest_name]
        state = CheckpointState(
            latest_name, tuple(tracked), tuple(1.0 + i for i, _ in enumerate(tracked))
        )
        (directory / "checkpoint").write_bytes(encode_state(state))
    expected = debris(
        sorted(names), tracked if latest_name else [], checkpoint_name="ckpt", latest=latest_name
    )

    async def open_manager() -> None:
        async with CheckpointManager(str(directory), max_to_keep=None):
            pass

    anyio.run(open_manager)
    removed = names - {p.name for p in directory.iterdir()}
    assert removed == set(expected)
