"""The one home for checkpoint file names (``anyckpt.formats.layout``): parsing every
built-in format's names, and the pure ``debris`` rule the manager and the CLI share."""

from __future__ import annotations

import ast
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


# -- the names' helpers: one home, inverse of each other -----------------------------------

_DIRS = st.sampled_from(["", "d/", "gs://b/x/"])


@given(_DIRS, stems, st.integers(0, 99_999), st.integers(1, 99_999))
def test_v1_names_round_trip(directory: str, stem: str, shard: int, num_shards: int) -> None:
    prefix = directory + stem
    pattern = layout.v1_pattern_path(prefix, num_shards)
    assert layout.split_v1_pattern(pattern) == (prefix, num_shards)
    assert layout.split_v1_pattern(prefix) is None
    shard_name = file_name(stem, layout.V1_SHARD, shard, num_shards)
    assert layout.v1_shard_path(prefix, shard, num_shards) == directory + shard_name
    assert layout.v1_shard_number(shard_name, stem) == (shard, num_shards)
    assert layout.v1_shard_number(shard_name, stem + "x") is None


@given(_DIRS, stems, st.integers(1, 99_999))
def test_sidecars_of_a_prefix_and_of_its_v1_pattern_are_the_same(
    directory: str, stem: str, num_shards: int
) -> None:
    prefix = directory + stem
    pattern = layout.v1_pattern_path(prefix, num_shards)
    assert layout.meta_path(prefix) == layout.meta_path(pattern) == prefix + ".meta"
    assert layout.metrics_path(prefix) == layout.metrics_path(pattern)
    assert parse_file_name(layout.metrics_path(stem)) == (stem, layout.METRICS)
    assert parse_file_name(layout.meta_path(stem)) == (stem, layout.META)


@given(stems, st.integers(0, 10**9), st.sampled_from(["ckpt", "model.ckpt", "a-1"]))
def test_steps(stem: str, step: int, name: str) -> None:
    prefix = f"{name}-{step}"
    assert layout.step_of(prefix, name) == step
    assert layout.step_of(prefix) == step
    assert layout.split_step(prefix, name) == step
    assert layout.split_step(layout.v1_pattern_path(prefix, 2), name) == step
    assert layout.split_name_step(layout.v1_pattern_path(prefix, 2)) == (name, step)
    assert layout.step_of(prefix, name + "x") is None
    assert layout.final_name(file_name(prefix, layout.TEMP)) == prefix
    assert layout.final_name(stem) == stem


def test_a_plugin_checkpoint_keeps_its_sidecars() -> None:
    # ckpt-4.zst is ckpt-4's file: its metrics and graph are not debris (they were: only V2
    # and V1 files counted as a checkpoint's, so a manager of a plugin format dropped the
    # metrics BestN retention reads from every checkpoint but the latest on each open).
    names = ["checkpoint", "ckpt-4.zst", "ckpt-4.metrics.json", "ckpt-4.meta"]
    names += ["ckpt-5.safetensors", "ckpt-5.metrics.json", "ckpt-3.metrics.json"]
    found = layout.debris_reasons(
        names, ["ckpt-4", "ckpt-5"], checkpoint_name="ckpt", latest="ckpt-5"
    )
    assert found == {"ckpt-3.metrics.json": layout.NO_CHECKPOINT[layout.METRICS]}


def test_debris_reasons() -> None:
    names = [
        "ckpt-5.index",
        "ckpt-5.data-00000-of-00001",
        "ckpt-6.data-00000-of-00001",  # no index
        "ckpt-7.index",  # complete, never recorded
        "ckpt-7.data-00000-of-00001",
        "ckpt-7.meta",
        "ckpt-2.meta",  # its checkpoint is gone
        f"ckpt-5.index{TEMP_MARKER}ab",
    ]
    found = layout.debris_reasons(names, ["ckpt-5"], checkpoint_name="ckpt", latest="ckpt-5")
    assert found == {
        "ckpt-7.index": layout.UNRECORDED,  # commit markers first
        "ckpt-6.data-00000-of-00001": layout.NO_INDEX,
        "ckpt-7.data-00000-of-00001": layout.UNRECORDED,
        "ckpt-7.meta": layout.UNRECORDED,
        "ckpt-2.meta": layout.NO_CHECKPOINT[layout.META],
        f"ckpt-5.index{TEMP_MARKER}ab": layout.TEMP_FILE,
    }
    assert debris(names, ["ckpt-5"], checkpoint_name="ckpt", latest="ckpt-5") == list(found)


# -- no other module restates a name rule ---------------------------------------------------

_SRC = Path(__file__).resolve().parents[1] / "src" / "anyckpt"
#: Pieces of checkpoint file names and patterns: spelled in formats/layout.py only.
_NAME_PIECES = (".index", ".data-", "-of-", ".meta", ".metrics.json", "?????", "-(\\d")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of ``path`` (f-string parts included) that are not docstrings
    and hold no space (prose, such as an error message, may name a file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and " " not in node.value
    ]


def test_no_module_but_layout_spells_a_file_name_rule() -> None:
    found = []
    for path in sorted(_SRC.rglob("*.py")):
        relative = path.relative_to(_SRC).as_posix()
        if relative == "formats/layout.py" or relative.startswith("_proto/"):
            continue
        found += [
            f"{relative}:{line}: {text!r}"
            for line, text in _code_strings(path)
            if any(piece in text for piece in _NAME_PIECES)
        ]
    assert found == []


def test_the_source_check_sees_a_restated_rule(tmp_path: Path) -> None:
    planted = tmp_path / "m.py"
    planted.write_text('"""Doc: PREFIX.index."""\nX = f"{p}.index"\nY = "an .index file"\n')
    assert [text for _, text in _code_strings(planted)] == [".index"]
