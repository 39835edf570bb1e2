"""``anyckpt demo [DIR]``: train, checkpoint in the background, stop, resume, verify, summarise."""

from __future__ import annotations

import argparse
from typing import Any

from ..demo import DemoConfig, DemoError, DemoResult, remove_demo_files, run_demo
from ._common import CliError, Context, ExitCode
from ._output import Progress, print_json


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="train a small NumPy model with background checkpoints, stop, resume, verify",
        description="Train a small NumPy model (no ML framework) in an async loop that "
        "checkpoints every N steps with anyckpt.CheckpointManager; stop part-way as if "
        "preempted; resume from the latest checkpoint in a fresh manager; check the restored "
        "state is bit-identical; and summarise what was kept (the newest and the best loss), "
        "preserved and how long the "
        "training loop was blocked per save. Running it again continues from the latest "
        "checkpoint in DIR.",
    )
    p.add_argument(
        "directory",
        metavar="DIR",
        nargs="?",
        default="./anyckpt-demo",
        help="where to checkpoint: a local path or fsspec URL such as memory://demo "
        "(default ./anyckpt-demo)",
    )
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--every", type=int, default=20, help="checkpoint every N steps (default 20)")
    p.add_argument(
        "--max-to-keep", type=int, default=3, help="checkpoints retention keeps (default 3)"
    )
    p.add_argument(
        "--size-mib",
        type=float,
        default=16.0,
        help="model size: parameters plus Adam state, in MiB (default 16)",
    )
    p.add_argument(
        "--preserve-every",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="preserve a checkpoint every SECONDS (keep_checkpoint_every_n_hours, scaled "
        "down for the demo; 0 turns it off; default 1)",
    )
    p.add_argument(
        "--keep-best",
        type=int,
        default=1,
        metavar="N",
        help="also keep the N checkpoints with the lowest loss (retention's BestN, beside "
        "the newest --max-to-keep); 0 keeps TensorFlow's rules alone (default 1)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="first remove the demo's own earlier checkpoints in DIR (ckpt-N files and the "
        "state file; nothing else)",
    )
    p.set_defaults(run=run)


class _CliReporter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.bar: Progress | None = None

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        self.ctx.echo(text)
        if self.bar is not None:
            self.bar.draw(force=True)

    def progress(self, done: int, total: int, step: int, loss: float) -> None:
        if self.bar is None or self.bar.total != total:
            self.bar = self.ctx.progress_bar("training", total, unit="steps")
        self.bar.done = done
        self.bar.note = f"step {step}  loss {loss:.4f}"
        self.bar.draw(force=done == total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def result_json(result: DemoResult) -> dict[str, Any]:
    return {
        "directory": result.directory,
        "start_step": result.start_step,
        "stopped_at": result.stopped_at,
        "resumed_from": result.resumed_from,
        "final_step": result.final_step,
        "restored_identical": result.restored_identical,
        "restore_seconds": result.restore_seconds,
        "kept": result.kept,
        "best": result.best,
        "preserved": result.preserved,
        "deleted": result.deleted,
        "bytes_saved": result.bytes_saved,
        "write_bytes_per_second": result.write_throughput,
        "train_seconds": result.train_seconds,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "saves": [
            {
                "step": s.step,
                "prefix": s.event.prefix,
                "loss": s.loss,
                "bytes": s.event.bytes,
                "blocked_seconds": s.blocked_seconds,
                "capture_seconds": s.event.capture_seconds,
                "write_seconds": s.event.write_seconds,
                "commit_seconds": s.event.commit_seconds,
                "throughput": s.event.throughput,
            }
            for s in result.saves
        ],
    }


async def run(ctx: Context, args: argparse.Namespace) -> int:
    try:
        config = DemoConfig(
            args.directory,
            steps=args.steps,
            every=args.every,
            max_to_keep=args.max_to_keep,
            size_mib=args.size_mib,
            preserve_every=args.preserve_every,
            keep_best=args.keep_best,
            storage_options=ctx.storage_options or None,
        )
    except DemoError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    if args.fresh:
        removed = remove_demo_files(config.directory, config.storage_options)
        if removed:
            ctx.echo(f"--fresh: removed {removed} files of earlier demo runs")
    reporter = _CliReporter(ctx)
    try:
        result = await run_demo(config, reporter)
    except DemoError as exc:
        raise CliError(str(exc), ExitCode.FAILED) from None
    finally:
        reporter.close()
    if ctx.json:
        print_json(result_json(result), ctx.out)
    else:
        ctx.echo("")
        ctx.echo(result.summary())
        ctx.echo("")
        if config.directory.startswith("memory://"):
            ctx.echo("(memory:// lives only as long as this process: nothing is left to inspect)")
        else:
            ctx.echo(f"look inside: anyckpt ls {config.directory}")
            ctx.echo(f"             anyckpt verify {config.directory}")
            ctx.echo(f"run again:   anyckpt demo {config.directory}  (continues from there)")
    return ExitCode.OK if result.restored_identical else ExitCode.DAMAGE
