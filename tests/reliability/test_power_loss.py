"""Power loss (issue 14): every state a power cut could leave during saves, checked.

The local backend's file operations during a run of saves are recorded
(:mod:`power_loss`: creates, writes with offsets and bytes, truncations, fsyncs of files and
directories, renames, links, unlinks, mkdirs, through a proxy of ``os`` in every anyckpt
module that does file I/O). Then, after every recorded operation (a crash point), the states
a power cut could leave under the persistence model (``weak``: the weakest POSIX model;
``ordered``: ext4 ``data=ordered``-like) are materialised into fresh directories, deduplicated,
up to a cap per crash point (sampled with a fixed seed beyond the extremes), and on each a new
``CheckpointManager`` must:

* find a latest checkpoint no older than the newest save whose ``await`` had returned before
  the crash point (confirmed durable), restoring with exactly that step's values;
* restore every confirmed checkpoint retention keeps;
* save again, and restore what it saved.

Scenarios: plain V2 saves, a retention sweep (``max_to_keep=2``: old checkpoints deleted),
V1 sharded saves, and the distributed commit (``SingleProcessCoordinator``). CI mode: up to 10
states per crash point in the weak model and 6 in the ordered one; ``ANYCKPT_RELIABILITY=long``:
256 and 64.

The same recording also asserts the order of docs/commit-protocol.md: each file's bytes are
fsynced before its rename, the data files are renamed before the index, the directory is
fsynced after the index and before the state file's rename, and again after the state file's
rename, before the save is confirmed; retention deletes an index before its data.
"""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from power_loss import Model, Op, Recording
from reliability_common import LONG, assert_values, record_figures, scaled, values

from anyckpt import CheckpointManager
from anyckpt.distributed import SingleProcessCoordinator
from anyckpt.storage import TEMP_MARKER

pytestmark = pytest.mark.anyio

AGAIN = 50  # the step a manager saves on a crash state (newer than any recorded)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Scenario:
    name: str
    kwargs: dict[str, Any]
    steps: int
    keep: int | None  # what retention keeps (None: everything)
    distributed: bool = False

    def manager(self, url: str, **extra: Any) -> CheckpointManager:
        kwargs = {**self.kwargs, **extra}
        if self.distributed:
            kwargs["coordinator"] = SingleProcessCoordinator()
        return CheckpointManager(url, lease_seconds=3600.0, **kwargs)


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("v2-save", {"max_to_keep": None}, steps=3, keep=None),
        Scenario("retention", {"max_to_keep": 2}, steps=4, keep=2),
        Scenario(
            "v1-sharded",
            {"format": "v1", "max_to_keep": 2, "format_options": {"num_shards": 2}},
            steps=3,
            keep=2,
        ),
        Scenario("distributed", {"max_to_keep": 2}, steps=3, keep=2, distributed=True),
    ]
}

#: States per crash point, by model.
CAPS = {"weak": scaled(10, 256), "ordered": scaled(6, 64)}


async def _record(
    scenario: Scenario, base: Path, *, new_directory: bool = False, durable: bool = True
) -> list[Op]:
    """Run the scenario's saves on ``base/ckpt`` while recording; mark each confirmed save.
    The directory exists (durably) before, unless ``new_directory``: then the manager makes it
    while recorded."""
    if not new_directory:
        (base / "ckpt").mkdir()
    with Recording(base) as recorder:
        async with scenario.manager(str(base / "ckpt"), durable=durable) as manager:
            for step in range(1, scenario.steps + 1):
                await (await manager.save(values(step), step=step))
                recorder.mark(f"confirmed {step}")
        return list(recorder.ops)


@dataclass
class Tally:
    crash_points: int = 0
    states: int = 0  # checked (distinct per crash point and confirmed floor)
    reused: int = 0  # the same state at a later crash point with the same floor
    outcomes: Counter[str] = field(default_factory=Counter)


async def _check_state(
    scenario: Scenario, directory: Path, floor: int, confirmed: list[int], how: str
) -> str:
    """The invariants on one materialised crash state; returns what it found (for figures)."""
    url = str(directory / "ckpt")
    async with scenario.manager(url, durable=False) as manager:
        latest = manager.latest_step
        context = (how, floor, latest, sorted(p.name for p in directory.rglob("*")))
        if floor:
            assert latest is not None, context
            assert latest >= floor, context
        if latest is not None:
            assert_values(await manager.restore(), latest)
            window = (
                confirmed
                if scenario.keep is None
                else [s for s in confirmed if s > latest - scenario.keep]
            )
            for step in window:
                assert_values(await manager.restore(step), step)
        outcome = (
            "empty"
            if latest is None
            else ("latest newer than confirmed" if latest > floor else "latest = confirmed")
        )
        await (await manager.save(values(AGAIN), step=AGAIN))
        assert manager.latest_step == AGAIN
        assert_values(await manager.restore(), AGAIN)
    return outcome


async def _simulate(
    scenario: Scenario,
    model_name: str,
    tmp_path: Path,
    *,
    new_directory: bool = False,
    durable: bool = True,
) -> Tally:
    base = tmp_path / "recorded"
    base.mkdir()
    ops = await _record(scenario, base, new_directory=new_directory, durable=durable)
    assert any(op.kind == "dirsync" for op in ops) == durable
    rng = random.Random(f"{scenario.name}/{model_name}")
    model = Model(durable=[] if new_directory else ["ckpt"])
    tally = Tally()
    checked: set[tuple[str, int]] = set()
    states = tmp_path / "states"
    states.mkdir()
    for op in ops:
        model.apply(op, model_name)
        if op.kind == "mark":
            continue
        tally.crash_points += 1
        confirmed = [int(label.split()[1]) for label in model.confirmed]
        floor = max(confirmed, default=0)
        for state in model.crash_states(model_name, CAPS[model_name], rng):
            key = (state.key(), floor)
            if key in checked:
                tally.reused += 1
                continue
            checked.add(key)
            directory = states / str(tally.states)
            state.materialise(directory)
            try:
                outcome = await _check_state(scenario, directory, floor, confirmed, state.how)
            except BaseException as exc:
                listing = [(p, None if d is None else len(d)) for p, d in state.files]
                raise AssertionError(
                    f"{scenario.name}/{model_name}: crash after op {tally.crash_points} {op!r} "
                    f"({state.how}); confirmed {confirmed}; on disk {listing}"
                ) from exc
            shutil.rmtree(directory)
            tally.states += 1
            tally.outcomes[outcome] += 1
    return tally


@pytest.mark.parametrize("model_name", ["weak", "ordered"])
@pytest.mark.parametrize("scenario_name", sorted(SCENARIOS))
async def test_every_power_cut_leaves_a_restorable_latest(
    scenario_name: str, model_name: str, tmp_path: Path
) -> None:
    started = time.perf_counter()
    tally = await _simulate(SCENARIOS[scenario_name], model_name, tmp_path)
    assert tally.states > tally.crash_points  # more than one state per crash point on average
    print(
        f"power loss {scenario_name}/{model_name}: {tally.crash_points} crash points, "
        f"{tally.states} distinct states checked ({tally.reused} repeats skipped), "
        f"{dict(tally.outcomes)}, {time.perf_counter() - started:.1f} s"
    )
    record_figures(
        "power-loss",
        {"scenario": scenario_name, "model": model_name, "crash_points": tally.crash_points,
         "states": tally.states, "repeats": tally.reused, "cap": CAPS[model_name],
         "long": LONG, **tally.outcomes},
    )  # fmt: skip


async def test_a_directory_the_manager_creates_survives_a_power_cut(tmp_path: Path) -> None:
    """The first save into a directory that did not exist: confirmed, then a power cut. The
    directory is durable in its parent (an fsync of the parent after its mkdir), so the weak
    model cannot lose it (this found the missing fsync; it was an expected failure)."""
    tally = await _simulate(SCENARIOS["v2-save"], "weak", tmp_path, new_directory=True)
    assert tally.states > tally.crash_points


async def test_a_new_directory_survives_under_the_ordered_model(tmp_path: Path) -> None:
    """The same run under the ext4-like model passes: an fsync there commits the mkdir too."""
    tally = await _simulate(SCENARIOS["v2-save"], "ordered", tmp_path, new_directory=True)
    assert tally.states > tally.crash_points


@pytest.mark.parametrize("model_name", ["weak", "ordered"])
async def test_the_simulator_catches_saves_that_are_not_durable(
    model_name: str, tmp_path: Path
) -> None:
    """Negative control: with ``durable=False`` (no fsync at all) a power cut loses confirmed
    saves, and the simulator must say so."""
    with pytest.raises(AssertionError, match=r"crash after op "):
        await _simulate(SCENARIOS["v2-save"], model_name, tmp_path, durable=False)


# -- the order of fsyncs and renames -------------------------------------------------------


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(TEMP_MARKER, 1)[0]


@pytest.mark.parametrize("scenario_name", ["retention", "v1-sharded", "distributed"])
async def test_fsync_order_follows_the_commit_protocol(scenario_name: str, tmp_path: Path) -> None:
    """From the recording: for each save, every file written is fsynced (by inode) before it
    is renamed to its name; the data files are renamed before the index (V1: the shards
    before the last, the commit marker); the directory is fsynced after the index's rename
    and before the state file's; the state file is fsynced before its rename, and the
    directory again after it, before the save is confirmed. Retention removes a dropped
    checkpoint's index before its data, after the state file that still tracks it."""
    scenario = SCENARIOS[scenario_name]
    base = tmp_path / "recorded"
    base.mkdir()
    ops = await _record(scenario, base)
    synced: set[int] = set()
    saves: list[list[tuple[str, str]]] = [[]]  # per confirmed save: (event, name) in order
    for op in ops:
        events = saves[-1]
        if op.kind == "fsync":
            synced.add(op.ino)
        elif op.kind == "rename":
            # Every rename moves a file whose bytes are on the disk already.
            assert op.ino in synced, (op, "renamed before its fsync")
            events.append(("rename", _name(op.dst)))
        elif op.kind == "dirsync":
            events.append(("dirsync", ""))
        elif op.kind == "unlink" and TEMP_MARKER not in op.path:
            events.append(("unlink", _name(op.path)))
        elif op.kind == "mark":
            saves.append([])
    assert len(saves) == scenario.steps + 1
    marker = (
        (lambda step: f"ckpt-{step}-00001-of-00002")
        if scenario_name == "v1-sharded"
        else (lambda step: f"ckpt-{step}.index")
    )
    for step, events in enumerate(saves[:-1], start=1):
        renames = [name for kind, name in events if kind == "rename"]
        index = renames.index(marker(step))
        data = [n for n in renames[:index] if n.startswith(f"ckpt-{step}")]
        assert data, (step, renames)  # the data files, before the index
        assert not [n for n in renames[index + 1 :] if n.startswith(f"ckpt-{step}")], renames
        at = events.index(("rename", marker(step)))
        state = events.index(("rename", "checkpoint"), at)
        assert ("dirsync", "") in events[at:state], (step, events)  # index durable first
        assert ("dirsync", "") in events[state:], (step, events)  # then the commit
        last_state = max(i for i, e in enumerate(events) if e == ("rename", "checkpoint"))
        assert events[-1] == ("dirsync", ""), events  # the save's last act
        assert last_state < len(events) - 1, events
        dropped = [n for kind, n in events if kind == "unlink"]
        if dropped:
            old = dropped[0].split(".")[0].split("-0")[0]
            assert dropped[0] == (
                f"{old}-00001-of-00002" if scenario_name == "v1-sharded" else f"{old}.index"
            ), dropped
            first_unlink = events.index(("unlink", dropped[0]))
            assert state < first_unlink  # the commit first, then the deletions
            assert ("rename", "checkpoint") in events[first_unlink:], events  # state rewritten
