"""``anyckpt ls`` and ``anyckpt prune`` agree with the manager on what is debris: what ``ls``
lists as left by interrupted saves (and as uncommitted checkpoints) is exactly what ``prune``
removes and what a manager opening the directory removes, for every format's names (V2, V1
shards, a plugin's file, ``.meta`` graphs, metrics sidecars, temporary files)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt import CheckpointManager
from anyckpt.cli._prune import debris as prune_debris
from anyckpt.cli._scan import UNCOMMITTED, Listing, scan
from anyckpt.codecs.state_file import CheckpointState, encode_state
from anyckpt.lease import LOCK_FILE
from anyckpt.storage import TEMP_MARKER, Storage

#: Real checkpoints: ckpt-3..5 tracked (5 the latest); ckpt-7 complete, never recorded.
_REAL = (3, 4, 5, 7)
_SUFFIXES = [
    ".index",
    ".data-00000-of-00001",
    "-00000-of-00002",
    "-00001-of-00002",
    ".meta",
    ".metrics.json",
    ".zst",
    "",
]
_JUNK = st.builds(
    lambda stem, step, suffix, temp: (
        f"{stem}-{step}{suffix}" + (f"{TEMP_MARKER}{step:04x}" if temp else "")
    ),
    st.sampled_from(["ckpt", "ckpt", "other"]),
    st.integers(1, 9),
    st.sampled_from(_SUFFIXES),
    st.booleans(),
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the real checkpoints (written once)."""
    template = tmp_path_factory.mktemp("template")
    for step in _REAL:
        anyckpt.sync.save(template / f"ckpt-{step}", {"w": np.full(3, float(step))})
    tracked = tuple(f"ckpt-{s}" for s in (3, 4, 5))
    state = CheckpointState("ckpt-5", tracked, (1.0, 2.0, 3.0))
    (template / "checkpoint").write_bytes(encode_state(state))
    return template


def _shown_by_ls(listing: Listing) -> set[str]:
    """What ``ls`` says a manager removes: the orphans, and uncommitted checkpoints' files."""
    uncommitted = {f.name for c in listing.checkpoints if c.status == UNCOMMITTED for f in c.files}
    return {o.name for o in listing.orphans} | uncommitted


@settings(max_examples=30, deadline=None)
@given(st.sets(_JUNK | st.sampled_from([f"checkpoint{TEMP_MARKER}1", "notes.txt"]), max_size=12))
def test_ls_prune_and_the_manager_agree_on_debris(template: Path, junk: set[str]) -> None:
    directory = Path(tempfile.mkdtemp(dir=template.parent))
    try:
        shutil.copytree(template, directory, dirs_exist_ok=True)
        for name in junk:
            if not (directory / name).exists():  # (a real checkpoint's file stays real)
                (directory / name).write_bytes(b'{"metrics": {}}')
        before = {p.name for p in directory.iterdir()}
        storage, root = Storage.from_url(str(directory))
        listing = anyio.run(scan, storage, root)
        removed_by_prune = {name for name, _ in prune_debris(listing)}
        assert _shown_by_ls(listing) == removed_by_prune
        assert set(listing.debris) == removed_by_prune

        async def open_manager() -> None:
            async with CheckpointManager(str(directory), max_to_keep=None):
                pass

        anyio.run(open_manager)
        after = {p.name for p in directory.iterdir()} - {LOCK_FILE}
        assert before - after == removed_by_prune
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_complete_unrecorded_checkpoint_is_uncommitted_and_removed(
    template: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "run"
    shutil.copytree(template, directory, dirs_exist_ok=True)
    (directory / "ckpt-7.meta").write_bytes(b"graph")
    (directory / "ckpt-2.metrics.json").write_bytes(b"{}")
    storage, root = Storage.from_url(str(directory))
    listing = anyio.run(scan, storage, root)
    status = {c.name: c.status for c in listing.checkpoints}
    assert status == {
        "ckpt-3": "tracked",
        "ckpt-4": "tracked",
        "ckpt-5": "tracked",
        "ckpt-7": UNCOMMITTED,
    }
    orphans = {o.name: o.reason for o in listing.orphans}
    assert orphans == {
        "ckpt-7.meta": "complete, but saved after the latest commit and never recorded in the "
        "state file",
        "ckpt-2.metrics.json": "metrics of a checkpoint not on disk",
    }
    removed = {name for name, _ in prune_debris(listing)}
    assert removed == {
        "ckpt-7.index",
        "ckpt-7.data-00000-of-00001",
        "ckpt-7.meta",
        "ckpt-2.metrics.json",
    }
