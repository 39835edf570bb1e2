"""The demo (``anyckpt demo``, README's first command): in-process through
:func:`anyckpt.demo.run_demo`, and as a user runs it, piped and on a terminal."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import anyio
import numpy as np
import pytest
from test_cli import ANSI, run, run_pty

import anyckpt
from anyckpt.demo import MLP, DemoConfig, DemoError, remove_demo_files, run_demo
from anyckpt.tensors import prepare


def small(directory: str, **kwargs: object) -> DemoConfig:
    options: dict[str, object] = {"steps": 30, "every": 10, "size_mib": 0.25, "preserve_every": 0}
    options.update(kwargs)
    return DemoConfig(directory, **options)  # type: ignore[arg-type]


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps: list[int] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def progress(self, done: int, total: int, step: int, loss: float) -> None:
        self.steps.append(step)


def test_stop_resume_and_bit_identical_restore() -> None:
    directory = f"memory://demo-{uuid.uuid4().hex}"
    recorder = Recorder()
    result = anyio.run(run_demo, small(directory), recorder)
    # 30 steps, saves every 10; the first part stops at 18 + 5 = 23, so step 20 is restored.
    assert (result.start_step, result.stopped_at, result.final_step) == (0, 23, 30)
    assert result.resumed_from == 20
    assert result.restored_identical
    assert [s.step for s in result.saves] == [10, 20, 30]
    assert [Path(p).name for p in result.kept] == ["ckpt-10", "ckpt-20", "ckpt-30"]
    assert result.preserved == result.deleted == []
    assert all(s.blocked_seconds >= 0 and s.event.bytes > 0 for s in result.saves)
    # Steps 21-23 ran, were lost with the stop, and ran again after the restore.
    assert recorder.steps == [*range(1, 24), *range(21, 31)]
    assert any("bit-identical" in line for line in recorder.lines)
    assert result.final_loss < result.first_loss
    summary = result.summary()
    for word in ("kept 3", "preserved 0", "loop blocked", "throughput", "bit-identical"):
        assert word in summary


def test_a_second_run_continues_from_the_latest_checkpoint() -> None:
    directory = f"memory://demo-{uuid.uuid4().hex}"
    first = anyio.run(run_demo, small(directory, keep_best=0), Recorder())
    again = anyio.run(run_demo, small(directory, max_to_keep=2, keep_best=0), Recorder())
    assert (again.start_step, again.final_step) == (30, 60)
    assert again.restored_identical
    assert [Path(p).name for p in again.kept] == ["ckpt-50", "ckpt-60"]
    assert [Path(p).name for p in again.deleted] == ["ckpt-10", "ckpt-20", "ckpt-30", "ckpt-40"]
    assert first.best is again.best is None


def test_best_n_keeps_the_best_loss_beside_the_newest() -> None:
    """Each save records its step's loss; BestN(1, "loss") keeps the lowest beside the newest
    max_to_keep (the losses are the model's: the best may be the newest or an older one)."""
    directory = f"memory://demo-{uuid.uuid4().hex}"
    config = small(directory, steps=120, every=10, max_to_keep=2)
    result = anyio.run(run_demo, config, Recorder())
    losses = {s.event.prefix: s.loss for s in result.saves}
    assert len(losses) == 12
    assert all(np.isfinite(list(losses.values())))
    # The best of all saves (ties: the newer) was never dropped: BestN kept it at every sweep.
    best = min(losses, key=lambda p: (losses[p], -int(p.rsplit("-", 1)[1])))
    assert result.best == best
    newest = sorted(losses, key=lambda p: int(p.rsplit("-", 1)[1]))[-2:]
    assert sorted(result.kept) == sorted({*newest, best})
    assert sorted(result.deleted) == sorted(set(losses) - {*newest, best})
    summary = result.summary()
    assert f"(best loss: {Path(best).name}, {losses[best]:.3f})" in summary


def test_retention_preserves_on_the_scaled_clock() -> None:
    directory = f"memory://demo-{uuid.uuid4().hex}"
    # Preserve one every 0 s (any positive interval that has passed): every checkpoint leaving
    # the window of 1 is preserved, none deleted.
    config = small(directory, steps=40, max_to_keep=1, preserve_every=1e-6, keep_best=0)
    result = anyio.run(run_demo, config, Recorder())
    assert result.deleted == []
    assert [Path(p).name for p in result.preserved] == ["ckpt-10", "ckpt-20", "ckpt-30"]


def test_another_model_size_in_the_directory_is_refused() -> None:
    directory = f"memory://demo-{uuid.uuid4().hex}"
    anyio.run(run_demo, small(directory), Recorder())
    with pytest.raises(DemoError, match="--fresh"):
        anyio.run(run_demo, small(directory, size_mib=0.5), Recorder())


def test_bad_options_are_refused() -> None:
    for kwargs in (
        {"steps": 1}, {"every": 0}, {"max_to_keep": 0}, {"size_mib": 0}, {"keep_best": -1}
    ):  # fmt: skip
        with pytest.raises(DemoError):
            small("memory://x", **kwargs)


def test_model_size_matches_the_request() -> None:
    model = MLP(MLP.hidden_for(4.0), seed=0)
    flat = prepare(model.state())
    assert abs(sum(a.nbytes for a in flat.values()) - 4 * 2**20) < 0.01 * 4 * 2**20


def test_fresh_removes_only_the_demos_files(tmp_path: Path) -> None:
    anyio.run(run_demo, small(str(tmp_path)), Recorder())
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other-1.index").write_text("not the demo's")
    removed = remove_demo_files(str(tmp_path))
    assert removed == 10  # 3 checkpoints of 3 files each (data, index, metrics), the state file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other-1.index"]


# -- as a user runs it -----------------------------------------------------------------------


def test_demo_command_piped(tmp_path: Path) -> None:
    args = ["demo", "run", "--steps", "40", "--every", "10", "--size-mib", "1"]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert not ANSI.search(out + result.stderr)
    assert "saved ckpt-10" in out
    assert "stopped at step 29, as if the job were preempted" in out
    assert "resumed in a fresh CheckpointManager from ckpt-20" in out
    assert "bit-identical" in out
    assert "summary" in out
    assert "loop blocked  per save: median" in out
    assert "anyckpt ls run" in out
    # What it left is an ordinary, TensorFlow-compatible checkpoint directory.
    assert anyckpt.sync.latest_checkpoint(str(tmp_path / "run")) == str(tmp_path / "run/ckpt-40")
    assert run("verify", str(tmp_path / "run")).returncode == 0

    again = run(*args, "--json", cwd=tmp_path)
    doc = json.loads(again.stdout)
    assert (doc["start_step"], doc["final_step"]) == (40, 80)
    assert doc["restored_identical"] is True
    assert len(doc["saves"]) == 4
    assert doc["best"] in doc["kept"]
    assert all(isinstance(s["loss"], float) for s in doc["saves"])

    fresh = run(*args, "--fresh", cwd=tmp_path)
    assert "--fresh: removed" in fresh.stdout
    assert "steps 1-40" in fresh.stdout


def test_demo_command_on_a_terminal_shows_progress(tmp_path: Path) -> None:
    code, output = run_pty(
        "demo", "memory://demo", "--steps", "40", "--every", "10", "--size-mib", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, output
    assert "training  [" in output
    assert "steps/s" in output
    assert "\x1b[K" in output
    assert "memory:// lives only as long as this process" in output


def test_demo_bad_option_is_a_usage_error(tmp_path: Path) -> None:
    result = run("demo", str(tmp_path), "--every", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("anyckpt: error: --every must be at least 1")


def test_the_readme_command_runs(tmp_path: Path) -> None:
    """``make demo`` runs ``anyckpt demo`` with its defaults in a fresh directory. (How long
    it takes is the benchmarks' business, not a test's: on a loaded CI machine it varies.)"""
    result = run("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bit-identical" in result.stdout
    assert (tmp_path / "anyckpt-demo" / "checkpoint").is_file()
    state = anyckpt.sync.get_checkpoint_state(str(tmp_path / "anyckpt-demo"))
    assert state is not None
    tracked = [Path(p).name for p in state.all_model_checkpoint_paths]
    # The newest three (max_to_keep), and the best loss of the tracked ones if it is older.
    assert tracked[-3:] == ["ckpt-160", "ckpt-180", "ckpt-200"]
    losses = {
        name: json.loads((tmp_path / "anyckpt-demo" / f"{name}.metrics.json").read_text())
        for name in tracked
    }
    best = min(tracked, key=lambda n: (losses[n]["metrics"]["loss"], -int(n.split("-")[1])))
    assert len(tracked) == (3 if best in tracked[-3:] else 4)
    assert f"(best loss: {best}," in result.stdout
    restored = anyckpt.sync.load(state.model_checkpoint_path)
    assert int(restored["step"]) == 200
    assert restored["params/w1"].dtype == np.float32
