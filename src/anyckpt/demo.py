"""The demo behind ``anyckpt demo``: an async training loop that checkpoints in the background.

A two-layer perceptron (NumPy only) learns a synthetic classification task with Adam. Every
``every`` steps the loop hands its state to :class:`anyckpt.CheckpointManager` and goes on
training while the checkpoint is written. At ``stop_at`` the run stops, as if the job were
preempted; a fresh manager then restores the latest checkpoint, checks it is bit-identical to
the state that was saved, and training resumes to the end. The result says how long the
training loop was blocked by each save, how fast the background writes went, and which
checkpoints retention kept, preserved and deleted. Each save records the step's loss
(``metrics={"loss": ...}``), and retention (``Any(LatestN, BestN, EveryNHours)``) keeps the
best-loss checkpoint beside the newest ones::

    import anyio
    from anyckpt.demo import DemoConfig, run_demo

    result = anyio.run(run_demo, DemoConfig("memory://demo", steps=40, every=10, size_mib=1))
    assert result.restored_identical

Running it again on the same directory continues from the latest checkpoint there.
"""

from __future__ import annotations

import math
import posixpath
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.to_thread
import numpy as np

from .formats import layout
from .manager import STATE_FILE, CheckpointManager, SaveEvent
from .retention import Any as AnyOf
from .retention import BestN, EveryNHours, LatestN, Policy
from .storage import Storage
from .tensors import flatten

__all__ = [
    "MLP",
    "DemoConfig",
    "DemoError",
    "DemoResult",
    "Reporter",
    "SaveRecord",
    "remove_demo_files",
    "run_demo",
]

INPUTS = 128
CLASSES = 10
BATCH = 64
LEARNING_RATE = 1e-3


class DemoError(Exception):
    """The demo cannot run as asked (for example, the directory holds another model)."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does. ``size_mib`` is the checkpoint size: parameters plus Adam state."""

    directory: str = "./anyckpt-demo"
    steps: int = 200
    every: int = 20
    max_to_keep: int = 3
    size_mib: float = 16.0
    #: Preserve a checkpoint leaving the window every this many seconds (TensorFlow's
    #: ``keep_checkpoint_every_n_hours``, scaled down for a demo); 0 preserves none.
    preserve_every: float = 1.0
    #: The step the first part stops at (default: three fifths of the way, plus half an
    #: interval, so the steps after the last checkpoint are lost and redone).
    stop_at: int | None = None
    #: Saves in flight before ``save()`` waits (``CheckpointManager(max_pending=...)``).
    max_pending: int = 2
    #: Also keep the checkpoints of the best this many losses (``BestN``); 0: TensorFlow's
    #: ``max_to_keep`` and ``keep_checkpoint_every_n_hours`` alone.
    keep_best: int = 1
    seed: int = 0
    storage_options: dict[str, Any] | None = None
    durable: bool = True

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise DemoError("--steps must be at least 2")
        if self.every < 1:
            raise DemoError("--every must be at least 1")
        if self.max_to_keep < 1:
            raise DemoError("--max-to-keep must be at least 1")
        if not 0 < self.size_mib <= 4096:
            raise DemoError("--size-mib must be in (0, 4096]")
        if self.preserve_every < 0:
            raise DemoError("the preservation interval must be >= 0")
        if self.keep_best < 0:
            raise DemoError("--keep-best must be >= 0")


@dataclass(frozen=True)
class SaveRecord:
    """One committed save: how long the loop waited in ``await manager.save`` and what the
    manager reported (:class:`anyckpt.SaveEvent`)."""

    step: int
    blocked_seconds: float
    event: SaveEvent
    loss: float = math.nan


@dataclass
class DemoResult:
    """What the demo did; :meth:`summary` renders the closing report."""

    directory: str
    start_step: int
    stopped_at: int
    resumed_from: int
    final_step: int
    saves: list[SaveRecord] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    preserved: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    restored_identical: bool = False
    #: The tracked checkpoint with the lowest recorded loss at the end (``best_checkpoint``).
    best: str | None = None
    restore_seconds: float = 0.0
    restore_bytes: int = 0
    first_loss: float = math.nan
    final_loss: float = math.nan
    train_seconds: float = 0.0

    @property
    def blocked(self) -> list[float]:
        return [s.blocked_seconds for s in self.saves]

    @property
    def bytes_saved(self) -> int:
        return sum(s.event.bytes for s in self.saves)

    @property
    def write_throughput(self) -> float:
        """Bytes per second of background writing (data and index files)."""
        seconds = sum(s.event.write_seconds for s in self.saves)
        return self.bytes_saved / seconds if seconds > 0 else 0.0

    def summary(self) -> str:
        def names(items: list[str]) -> str:
            return " ".join(posixpath.basename(p) for p in items) or "-"

        blocked = self.blocked or [0.0]
        captures = [s.event.capture_seconds for s in self.saves] or [0.0]
        writes = [s.event.write_seconds + s.event.commit_seconds for s in self.saves] or [0.0]
        steps = self.final_step - self.start_step
        identical = "bit-identical" if self.restored_identical else "NOT identical"
        best = ""
        if self.best is not None:
            losses = {s.event.prefix: s.loss for s in self.saves}
            loss = losses.get(self.best, math.nan)
            best = f" (best loss: {posixpath.basename(self.best)}, {loss:.3f})"
        lines = [
            "summary",
            f"  checkpoints   kept {len(self.kept)}: {names(self.kept)}{best}",
            f"                preserved {len(self.preserved)}: {names(self.preserved)}; "
            f"deleted by retention {len(self.deleted)}",
            f"  saved         {len(self.saves)} checkpoints, {format_bytes(self.bytes_saved)} "
            f"({format_bytes(self.bytes_saved / max(len(self.saves), 1))} each)",
            f"  throughput    {format_bytes(self.write_throughput)}/s written in the background "
            f"(median {format_duration(statistics.median(writes))} per save to commit)",
            f"  loop blocked  per save: median {format_duration(statistics.median(blocked))}, "
            f"max {format_duration(max(blocked))} (the capture copy: median "
            f"{format_duration(statistics.median(captures))})",
            f"  resume        step {self.resumed_from} restored in "
            f"{format_duration(self.restore_seconds)} "
            f"({format_bytes(self.restore_bytes)}), {identical}",
            f"  training      {steps} steps in {format_duration(self.train_seconds)}, "
            f"loss {self.first_loss:.3f} -> {self.final_loss:.3f}",
        ]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``0.0042`` -> ``4.2 ms``."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Reporter(Protocol):
    """Where the demo reports: lines of text, and the step it is at (for a progress bar)."""

    def message(self, text: str) -> None: ...

    def progress(self, done: int, total: int, step: int, loss: float) -> None: ...


class _PrintReporter:
    def message(self, text: str) -> None:
        print(text, flush=True)

    def progress(self, done: int, total: int, step: int, loss: float) -> None:
        pass


class MLP:
    """A two-layer perceptron with Adam, in NumPy: state in, state out, nothing hidden."""

    def __init__(self, hidden: int, seed: int, init: int = 0) -> None:
        rng = np.random.default_rng([seed, 0, init])
        self.params = {
            "w1": (rng.standard_normal((INPUTS, hidden)) * math.sqrt(2 / INPUTS)).astype(
                np.float32
            ),
            "b1": np.zeros(hidden, np.float32),
            "w2": (rng.standard_normal((hidden, CLASSES)) * math.sqrt(1 / hidden)).astype(
                np.float32
            ),
            "b2": np.zeros(CLASSES, np.float32),
        }
        self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.t = 0
        self.teacher = np.random.default_rng([seed, 1]).standard_normal((INPUTS, CLASSES))
        self.seed = seed

    @staticmethod
    def hidden_for(size_mib: float) -> int:
        """The hidden width whose parameters and Adam moments take ``size_mib`` MiB."""
        per_unit = 3 * 4 * (INPUTS + CLASSES + 1)  # float32 params, m and v per hidden unit
        return max(8, int(size_mib * 2**20 / per_unit))

    def state(self) -> dict[str, Any]:
        return {"params": self.params, "adam": {"m": self.m, "v": self.v}, "step": self.t}

    def load(self, flat: dict[str, np.ndarray]) -> None:
        """Take the state from ``restore()``'s flat names (``params/w1``...)."""
        mine = flatten(self.state())
        if set(flat) != set(mine):
            raise DemoError(
                "the checkpoint holds other tensors than the demo model's "
                "(pass --fresh to start over, or use another directory)"
            )
        for key, value in flat.items():
            if np.shape(mine[key]) != value.shape:
                raise DemoError(
                    f"the checkpoint's {key} has shape {value.shape}, the model's "
                    f"{np.shape(mine[key])}: it was saved with another --size-mib "
                    "(pass --fresh to start over, or use another directory)"
                )
        for group, target in (("params", self.params), ("adam/m", self.m), ("adam/v", self.v)):
            for key in target:
                target[key] = np.array(flat[f"{group}/{key}"], dtype=np.float32)
        self.t = int(flat["step"])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of ``step``: the same on every run, so a resumed run sees the same data."""
        x = np.random.default_rng([self.seed, 2, step]).standard_normal((BATCH, INPUTS))
        y = np.argmax(x @ self.teacher, axis=1)
        return x.astype(np.float32), y

    def train_step(self, step: int) -> float:
        """One Adam step on the batch of ``step``; returns the loss before it."""
        x, y = self.batch(step)
        p = self.params
        pre = x @ p["w1"] + p["b1"]
        hidden = np.maximum(pre, 0)
        logits = hidden @ p["w2"] + p["b2"]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        loss = float(-np.mean(np.log(probs[np.arange(BATCH), y] + 1e-12)))
        dlogits = probs
        dlogits[np.arange(BATCH), y] -= 1
        dlogits /= BATCH
        dhidden = (dlogits @ p["w2"].T) * (pre > 0)
        grads = {
            "w1": x.T @ dhidden,
            "b1": dhidden.sum(axis=0),
            "w2": hidden.T @ dlogits,
            "b2": dlogits.sum(axis=0),
        }
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        scale = LEARNING_RATE * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for key, grad in grads.items():
            m, v = self.m[key], self.v[key]
            m *= b1
            m += (1 - b1) * grad
            v *= b2
            v += (1 - b2) * np.square(grad)
            p[key] -= scale * m / (np.sqrt(v) + eps)
        return loss


#: The roles (:mod:`anyckpt.formats.layout`) of the demo's files: it saves V2 with metrics.
_DEMO_ROLES = (layout.INDEX, layout.DATA, layout.METRICS)


def _is_demo_file(name: str) -> bool:
    """Whether ``name`` is a file of the demo's checkpoints (``ckpt-N``), its state file, or
    the temporary name of one."""
    parsed = layout.parse_file_name(name)
    if parsed is not None and parsed.role == layout.TEMP:
        parsed = layout.parse_file_name(parsed.stem)
    if parsed is None:
        return False
    if parsed.role == layout.STATE:
        return True
    return parsed.role in _DEMO_ROLES and layout.step_of(parsed.stem, "ckpt") is not None


def remove_demo_files(directory: str, storage_options: dict[str, Any] | None = None) -> int:
    """Delete the demo's own checkpoints in ``directory`` (``ckpt-N`` files with their metrics
    sidecars, the state file and their temporary files); leave everything else. Returns the
    number of files removed."""
    storage, root = Storage.from_url(directory, storage_options)
    removed = 0
    names = storage.listdir(root)
    # Commit markers first: the state file, then indexes, then data.
    names.sort(key=lambda n: (n != STATE_FILE, layout.role_of(n) != layout.INDEX))
    for name in names:
        if _is_demo_file(name):
            removed += storage.remove(posixpath.join(root, name))
    return removed


def _identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    if set(a) != set(b):
        return False
    for key, x in a.items():
        y = b[key]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def _snapshot(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in flatten(state).items()}


async def run_demo(config: DemoConfig, reporter: Reporter | None = None) -> DemoResult:
    """Run the demo (see the module docstring) and return what it measured."""
    out = reporter or _PrintReporter()
    hidden = MLP.hidden_for(config.size_mib)
    model = MLP(hidden, config.seed)
    size = sum(a.nbytes for a in flatten(model.state()).values() if isinstance(a, np.ndarray))
    hours = config.preserve_every / 3600 if config.preserve_every else None
    losses_at: dict[int, float] = {}
    result = DemoResult(config.directory, 0, 0, 0, 0)

    def on_event(event: SaveEvent) -> None:
        blocked = event.blocked_seconds
        loss = losses_at.pop(event.step, math.nan)
        result.saves.append(SaveRecord(event.step, blocked, event, loss))
        result.deleted.extend(event.deleted)
        result.preserved.extend(event.preserved)
        extra = ""
        if event.preserved:
            extra += f", preserved {' '.join(posixpath.basename(p) for p in event.preserved)}"
        if event.deleted:
            extra += f", deleted {' '.join(posixpath.basename(p) for p in event.deleted)}"
        out.message(
            f"  step {event.step:>5}  saved {posixpath.basename(event.prefix)} "
            f"({format_bytes(event.bytes)}, loss {loss:.3f}): loop blocked "
            f"{format_duration(blocked)}, "
            f"written in {format_duration(event.write_seconds + event.commit_seconds)} "
            f"({format_bytes(event.throughput)}/s){extra}"
        )

    def manager() -> CheckpointManager:
        if config.keep_best:  # TF's pair, and the best losses beside them
            parts: list[Policy] = [LatestN(config.max_to_keep), BestN(config.keep_best, "loss")]
            if hours:
                parts.append(EveryNHours(hours))
            rules: dict[str, Any] = {"retention": AnyOf(*parts)}
        else:
            rules = {"max_to_keep": config.max_to_keep, "keep_checkpoint_every_n_hours": hours}
        return CheckpointManager(
            config.directory,
            **rules,
            storage_options=config.storage_options,
            max_pending=config.max_pending,
            durable=config.durable,
            on_event=on_event,
        )

    async def train(mgr: CheckpointManager, first: int, last: int) -> None:
        started = time.perf_counter()
        for step in range(first, last + 1):
            loss = await anyio.to_thread.run_sync(model.train_step, step)
            if math.isnan(result.first_loss):
                result.first_loss = loss
            result.final_loss = loss
            out.progress(step - result.start_step, config.steps, step, loss)
            if step % config.every == 0:
                losses_at[step] = loss
                await mgr.save(model.state(), step=step, metrics={"loss": loss})
                snapshots[step] = _snapshot(model.state())
                for old in [s for s in snapshots if s < step]:
                    del snapshots[old]
        result.train_seconds += time.perf_counter() - started

    snapshots: dict[int, dict[str, np.ndarray]] = {}
    async with manager() as mgr:
        start = mgr.latest_step or 0
        if start:
            restored = await mgr.restore()
            model.load(restored)
            out.message(
                f"found ckpt-{start} from an earlier run in {config.directory}: continuing "
                "from there (--fresh starts over)"
            )
        result.start_step = start
        end = start + config.steps
        default_stop = start + config.steps * 3 // 5 + config.every // 2
        stop_at = config.stop_at if config.stop_at is not None else default_stop
        stop_at = min(max(stop_at, start + 1), end - 1)
        result.stopped_at, result.final_step = stop_at, end
        out.message(
            f"anyckpt demo: a 2-layer perceptron ({format_bytes(size)} of parameters and Adam "
            f"state) on synthetic data, steps {start + 1}-{end}"
        )
        out.message(
            f"  checkpoints every {config.every} steps to {config.directory} "
            f"(max_to_keep={config.max_to_keep}, max_pending={config.max_pending}"
            + (f", keeping the best {config.keep_best} by loss" if config.keep_best else "")
            + (f", preserving one every {config.preserve_every:g} s" if hours else "")
            + ")"
        )
        out.message("")
        await train(mgr, start + 1, stop_at)
        out.message("")
        out.message(
            f"stopped at step {stop_at}, as if the job were preempted; waiting for the "
            "background saves to commit"
        )
    latest = mgr.latest_step or start
    out.message(f"latest committed checkpoint: ckpt-{latest}")
    out.message("")

    # A new process would start here: a fresh model and a fresh manager on the same directory.
    model = MLP(hidden, config.seed, init=1)  # other initial weights: restore must replace them
    async with manager() as mgr:
        resumed = mgr.latest_step or 0
        result.resumed_from = resumed
        if resumed:
            started = time.perf_counter()
            restored = await mgr.restore()
            result.restore_seconds = time.perf_counter() - started
            result.restore_bytes = sum(a.nbytes for a in restored.values())
            model.load(restored)
            expected = snapshots.get(resumed)
            result.restored_identical = expected is not None and _identical(
                expected, _snapshot(model.state())
            )
            verdict = (
                "bit-identical to the state saved at that step"
                if result.restored_identical
                else "DIFFERENT from the state saved at that step"
            )
            out.message(
                f"resumed in a fresh CheckpointManager from ckpt-{resumed} "
                f"({format_bytes(result.restore_bytes)} in "
                f"{format_duration(result.restore_seconds)}): {verdict}"
            )
            if resumed < result.stopped_at:
                out.message(
                    f"  steps {resumed + 1}-{result.stopped_at} ran after that checkpoint "
                    "and are trained again"
                )
        out.message("")
        await train(mgr, resumed + 1, end)
        await mgr.wait()
        result.kept = mgr.checkpoints
        result.best = await mgr.best_checkpoint("loss") if config.keep_best else None
    result.saves.sort(key=lambda s: s.step)
    return result


def sync_run_demo(config: DemoConfig, reporter: Reporter | None = None) -> DemoResult:
    """Blocking :func:`run_demo`."""
    return anyio.run(run_demo, config, reporter)
