"""Preemption (issue 16): ``save_on_signal=(SIGTERM,)`` makes the next ``save()`` write
whatever the save policy says; leaving the manager commits it. A real trainer process gets
SIGTERM mid-training, saves the step after it, exits on its own, and the checkpoint restores
exactly. Handlers are set on the main thread only and restored on close."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import anyckpt
from anyckpt.preemption import PreemptionWatch
from anyckpt.save_policy import IntervalSteps

ROOT = Path(__file__).resolve().parents[1]

TRAINER = textwrap.dedent(
    """
    import signal, sys, time
    import anyio
    import numpy as np
    import anyckpt
    from anyckpt.save_policy import AtSteps

    mode, directory = sys.argv[1], sys.argv[2]

    def state(step):
        return {"w": np.full((512, 512), step, np.float32), "opt": {"m": np.arange(64.0) * step}}

    # A policy that never writes: only the preemption makes a checkpoint.
    OPTIONS = dict(save_policy=AtSteps(()), save_on_signal=(signal.SIGTERM,))

    def train_step():
        time.sleep(0.02)

    if mode == "sync":
        with anyckpt.sync.CheckpointManager(directory, **OPTIONS) as manager:
            step = 0
            while True:
                step += 1
                train_step()
                print(f"step {step}", flush=True)
                pending = manager.save(state(step), step=step)
                if manager.preemption.should_stop:
                    print(f"stopping {step} {pending.reason}", flush=True)
                    break
    else:
        async def main():
            async with anyckpt.CheckpointManager(directory, **OPTIONS) as manager:
                step = 0
                while True:
                    step += 1
                    await anyio.to_thread.run_sync(train_step)
                    print(f"step {step}", flush=True)
                    pending = await manager.save(state(step), step=step)
                    if manager.preemption.should_stop:
                        print(f"stopping {step} {pending.reason}", flush=True)
                        break

        anyio.run(main)
    print("exited cleanly", flush=True)
    """
)


def expected_state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.full((512, 512), step, np.float32), "opt/m": np.arange(64.0) * step}


@pytest.mark.parametrize("mode", ["sync", "asyncio"])
def test_sigterm_mid_training_commits_the_next_step_and_exits(tmp_path: Path, mode: str) -> None:
    directory = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER, mode, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        seen = 0
        for line in child.stdout:  # training is under way: step 5 reached
            if line.startswith("step "):
                seen = int(line.split()[1])
                if seen == 5:
                    break
        assert seen == 5, child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGTERM)
        # A hang guard only (a generous one); the test asserts no timing.
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert "exited cleanly" in out
    stopping = [line for line in out.splitlines() if line.startswith("stopping")]
    assert len(stopping) == 1, out
    assert "SIGTERM received" in stopping[0]
    stopped_at = int(stopping[0].split()[1])
    assert stopped_at >= 5  # the first save() after the signal (sent once step 5 trained)
    latest = anyckpt.sync.latest_checkpoint(str(directory))
    assert latest == f"{directory}/ckpt-{stopped_at}"
    # The policy skipped every other save: only the forced one was written.
    assert sorted(p.name for p in directory.glob("*.index")) == [f"ckpt-{stopped_at}.index"]
    restored = anyckpt.sync.load(latest)
    expected = expected_state(stopped_at)
    assert sorted(restored) == sorted(expected)
    for key, value in expected.items():
        assert restored[key].dtype == value.dtype
        assert restored[key].tobytes() == value.tobytes()


def _marker(signum: int, frame: Any) -> None:
    raise AssertionError("the previous handler must not run while the manager watches")


def test_in_process_signal_forces_the_next_save_and_handlers_come_back(tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGTERM, _marker)
    try:
        with anyckpt.sync.CheckpointManager(
            tmp_path, save_policy=IntervalSteps(100), save_on_signal=(signal.SIGTERM,)
        ) as manager:
            assert signal.getsignal(signal.SIGTERM) is not _marker
            assert manager.save({"w": np.zeros(2)}, step=1).reason == "the first save"
            assert manager.save({"w": np.ones(2)}, step=2).skipped
            assert not manager.preemption.should_stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert manager.preemption.requested
            forced = manager.save({"w": np.full(2, 3.0)}, step=3)
            assert not forced.skipped
            assert "SIGTERM" in forced.reason
            assert manager.preemption.should_stop
            # One signal forces one save: the policy decides again afterwards.
            assert manager.save({"w": np.zeros(2)}, step=4).skipped
        assert signal.getsignal(signal.SIGTERM) is _marker
        assert anyckpt.sync.latest_checkpoint(str(tmp_path)) == f"{tmp_path}/ckpt-3"

        async def main() -> None:
            async with anyckpt.CheckpointManager(
                tmp_path, save_on_signal=(signal.SIGTERM,)
            ) as manager:
                assert signal.getsignal(signal.SIGTERM) is not _marker
                assert manager.preemption is not None
                assert not manager.preemption.requested

        anyio.run(main)
        assert signal.getsignal(signal.SIGTERM) is _marker
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signal_handlers_only_on_the_main_thread(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with anyckpt.sync.CheckpointManager(tmp_path, save_on_signal=(signal.SIGTERM,)):
                pass
        except BaseException as exc:
            errors.append(exc)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], ValueError)
    assert "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGTERM) is before


def test_watch_request_and_bad_arguments() -> None:
    watch = PreemptionWatch([signal.SIGUSR1])
    assert not watch.requested
    assert not watch.should_stop
    watch.request(signal.SIGUSR1)
    assert watch.requested
    assert watch.signal_name == "SIGUSR1"
    assert watch.consume() == "SIGUSR1"
    assert watch.should_stop
    assert watch.consume() is None
    with pytest.raises(ValueError, match="at least one signal"):
        PreemptionWatch([])
    with pytest.raises(ValueError, match="12345"):
        PreemptionWatch([12345])
