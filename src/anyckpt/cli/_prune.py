"""``anyckpt prune DIR``: apply the retention policy now, as a manager does after a save.

``--dry-run`` computes the decision with :func:`anyckpt.retention.apply_retention` on the state
recovered from the directory's state file (:func:`anyckpt.retention.recover`, as a manager
starting there would) and explains it. Without ``--dry-run`` a :class:`CheckpointManager`
opens the directory (removing what interrupted saves left, as it always does) and runs its
own :meth:`~anyckpt.CheckpointManager.sweep`, the code path of a save's commit.

``--keep-best``, ``--every-n-steps``, ``--keep-for`` and ``--keep-steps`` add composable
policies (:mod:`anyckpt.retention`) to TF's pair; with them, or with ``--explain``, each
checkpoint's line says which policy keeps it, or why each one lets it go
(:func:`anyckpt.retention.decide`).
"""

from __future__ import annotations

import argparse
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from ..formats import layout
from ..manager import STATE_FILE, CheckpointManager
from ..retention import (
    Any as AnyOf,
)
from ..retention import (
    BestN,
    Candidate,
    EveryNHours,
    EveryNSteps,
    KeepFor,
    LatestN,
    Policy,
    RetentionPolicy,
    Steps,
    apply_retention,
    decide,
)
from ._common import CliError, Context, ExitCode
from ._output import format_bytes, format_time, print_json, table
from ._scan import TRACKED, UNCOMMITTED, Listing, scan


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prune",
        parents=[common],
        help="apply the retention policy now (what it deletes, and why)",
        description="Apply TensorFlow's retention rules to the checkpoints the state file "
        "tracks, as a CheckpointManager does after each save: keep the newest --max-to-keep, "
        "preserve one every --keep-every-n-hours, delete the rest. Checkpoints the state file "
        "does not track are never deleted. With --dry-run, only print what would happen.",
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument(
        "--max-to-keep",
        type=_positive_int,
        default=5,
        metavar="N",
        help="keep the newest N tracked checkpoints (default 5, as CheckpointManager)",
    )
    p.add_argument(
        "--keep-every-n-hours",
        type=float,
        default=None,
        metavar="H",
        help="preserve a checkpoint leaving the window if saved H hours after the last one",
    )
    p.add_argument(
        "--checkpoint-name",
        default=None,
        metavar="NAME",
        help="the manager's checkpoint_name (default: taken from the latest checkpoint)",
    )
    p.add_argument(
        "--keep-best",
        type=_best,
        default=None,
        metavar="N:METRIC[:max]",
        help="also keep the N checkpoints with the lowest (or highest) recorded METRIC",
    )
    p.add_argument(
        "--every-n-steps",
        type=_positive_int,
        default=None,
        metavar="K",
        help="also keep every checkpoint whose step is a multiple of K",
    )
    p.add_argument(
        "--keep-for",
        type=float,
        default=None,
        metavar="SECONDS",
        help="also keep every checkpoint saved less than SECONDS ago",
    )
    p.add_argument(
        "--keep-steps",
        type=_steps,
        default=None,
        metavar="S,S,...",
        help="also keep the checkpoints of these steps",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="for each checkpoint, say which policy keeps it or why each lets it go",
    )
    p.add_argument("--dry-run", "-n", action="store_true", help="change nothing; explain")
    p.set_defaults(run=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _best(text: str) -> BestN:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit():
        raise argparse.ArgumentTypeError("expected N:METRIC or N:METRIC:max")
    try:
        return BestN(int(parts[0]), parts[1], parts[2] if len(parts) == 3 else "min")  # type: ignore[arg-type]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _steps(text: str) -> Steps:
    try:
        return Steps(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected steps like 100,200: {exc}") from None


def build_policy(args: argparse.Namespace) -> Policy | None:
    """The composed policy of the options, or None when they are TF's pair alone."""
    extra: list[Policy] = []
    if args.keep_best is not None:
        extra.append(args.keep_best)
    if args.every_n_steps is not None:
        extra.append(EveryNSteps(args.every_n_steps))
    if args.keep_for is not None:
        extra.append(KeepFor(args.keep_for))
    if args.keep_steps is not None:
        extra.append(args.keep_steps)
    if not extra and not args.explain:
        return None
    parts: list[Policy] = [LatestN(args.max_to_keep)]
    if args.keep_every_n_hours:
        parts.append(EveryNHours(args.keep_every_n_hours))
    return AnyOf(*parts, *extra)


def explain(listing: Listing, policy: Policy, now: float) -> tuple[list[Action], float | None]:
    """What a sweep with the composed ``policy`` does to each checkpoint, with the reasons
    :func:`anyckpt.retention.decide` gives (latest always kept)."""
    if listing.recovered is None:
        return plan(listing, RetentionPolicy(None))
    by_name = {c.name: c for c in listing.checkpoints}
    recovered = listing.recovered
    candidates = []
    for t in recovered.tracked:
        info = by_name.get(t.path)
        step = info.step if info is not None else None
        metrics = (info.metrics or {}) if info is not None else {}
        candidates.append(Candidate(t.path, t.timestamp, step, metrics))
    result = decide(
        candidates,
        recovered.last_preserved_timestamp,
        policy,
        now=now,
        latest=listing.latest,
        explain=True,
    )
    d = result.decision
    verbs = {t.path: "preserve" for t in d.preserve}
    verbs.update({t.path: "delete" for t in d.delete})
    actions: list[Action] = []
    for c in candidates:  # oldest first
        info = by_name.get(c.path)
        size = info.size if info is not None else 0
        actions.append(Action(c.path, verbs.get(c.path, "keep"), result.reasons[c.path], size))
    untracked, _ = plan(listing, RetentionPolicy(None))
    decided = {a.name for a in actions}
    actions += [a for a in untracked if a.name not in decided]
    return actions, d.last_preserved_timestamp


@dataclass
class Action:
    name: str
    action: str  # delete, preserve, keep
    reason: str
    size: int


def plan(listing: Listing, policy: RetentionPolicy) -> tuple[list[Action], float | None]:
    """What a sweep with ``policy`` does to each checkpoint, and why; and the new
    ``last_preserved_timestamp``."""
    sizes = {c.name: c.size for c in listing.checkpoints}
    actions: list[Action] = []
    recovered = listing.recovered
    if recovered is None:
        nothing = "no state file: nothing is tracked"
        return [Action(c.name, "keep", nothing, c.size) for c in listing.checkpoints], None
    tracked = list(recovered.tracked)
    decision = apply_retention(tracked, recovered.last_preserved_timestamp, policy)
    n = policy.max_to_keep
    hours = policy.keep_checkpoint_every_n_hours
    last = recovered.last_preserved_timestamp
    preserved = {t.path for t in decision.preserve}
    for t in tracked[: len(tracked) - len(decision.keep)]:
        beyond = (
            f"beyond max_to_keep={n} ({len(tracked)} tracked), saved {format_time(t.timestamp)}"
        )
        if t.path in preserved:
            reason = (
                f"{beyond}; at least {hours:g} h after the last preserved checkpoint "
                f"({format_time(last)}): kept forever, no longer tracked"
            )
            last = t.timestamp
            actions.append(Action(t.path, "preserve", reason, sizes.get(t.path, 0)))
        else:
            why = (
                f"less than {hours:g} h after the last preserved checkpoint ({format_time(last)})"
                if hours
                else "keep_checkpoint_every_n_hours is not set"
            )
            actions.append(Action(t.path, "delete", f"{beyond}; {why}", sizes.get(t.path, 0)))
    for t in decision.keep:
        window = "all tracked are kept" if n is None else f"one of the newest {n}"
        actions.append(Action(t.path, "keep", f"tracked, {window}", sizes.get(t.path, 0)))
    decided = {a.name for a in actions}
    for c in listing.checkpoints:
        if c.name in decided:
            continue
        if c.status == UNCOMMITTED:
            reason = "never committed: removed when a manager opens the directory"
        elif c.status != TRACKED and c.in_state_file:
            reason = "in the state file but not adopted (no timestamp after the last preserved)"
        else:
            reason = "not tracked: retention never deletes it"
        actions.append(
            Action(c.name, "keep" if c.status != UNCOMMITTED else "remove", reason, c.size)
        )
    return actions, decision.last_preserved_timestamp


def debris(listing: Listing) -> list[tuple[str, str]]:
    """What a manager named ``listing.debris_name`` removes on opening the directory, with
    reasons: the listing's debris (the one rule, :func:`anyckpt.formats.layout.debris_reasons`,
    which ``ls`` shows too) and the unfinished uploads of its names."""
    found = list(listing.debris.items())
    for upload in listing.uploads:
        name = posixpath.basename(upload.path)
        if layout.is_managed(layout.final_name(name), listing.debris_name):
            found.append((name, f"unfinished multipart upload ({format_bytes(upload.size)})"))
    return found


async def run(ctx: Context, args: argparse.Namespace) -> int:
    try:
        policy = RetentionPolicy(args.max_to_keep, args.keep_every_n_hours)
        composed = build_policy(args)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    storage, root = ctx.storage(args.directory)
    listing = await scan(storage, root, checkpoint_name=args.checkpoint_name)
    if listing.state_error:
        state_file = storage.url(posixpath.join(root, STATE_FILE))
        raise CliError(
            f"cannot prune: unreadable state file {state_file}: {listing.state_error}",
            ExitCode.DAMAGE,
        )
    if listing.unsafe:
        raise CliError(
            f"cannot prune: the state file names {listing.unsafe[0]!r}, outside {listing.url}"
        )
    name = listing.debris_name
    if composed is None:
        actions, _ = plan(listing, policy)
    else:
        actions, _ = explain(listing, composed, time.time())
    removed = debris(listing)
    deleted: list[str] = []
    preserved: list[str] = []
    if not args.dry_run:
        if composed is None:
            manager = CheckpointManager(
                args.directory,
                max_to_keep=policy.max_to_keep,
                keep_checkpoint_every_n_hours=policy.keep_checkpoint_every_n_hours,
                checkpoint_name=name,
                storage_options=ctx.storage_options,
                allow_symlinks=ctx.allow_symlinks,
            )
        else:
            manager = CheckpointManager(
                args.directory,
                checkpoint_name=name,
                storage_options=ctx.storage_options,
                allow_symlinks=ctx.allow_symlinks,
                retention=composed,
            )
        async with manager:
            done, kept = await manager.sweep()
        deleted = [p.rsplit("/", 1)[-1] for p in done]
        preserved = [p.rsplit("/", 1)[-1] for p in kept]
        if sorted(deleted) != sorted(a.name for a in actions if a.action == "delete"):
            ctx.warn("the directory changed while pruning; run 'anyckpt ls' to see its state")

    doomed = [a for a in actions if a.action == "delete"]
    if ctx.json:
        print_json(
            {
                "directory": listing.url,
                "dry_run": args.dry_run,
                "policy": {
                    "max_to_keep": policy.max_to_keep,
                    "keep_checkpoint_every_n_hours": policy.keep_checkpoint_every_n_hours,
                    "checkpoint_name": name,
                    "retention": None if composed is None else str(composed),
                },
                "actions": [
                    {"name": a.name, "action": a.action, "reason": a.reason, "size": a.size}
                    for a in actions
                ],
                "debris": [{"name": n, "reason": r} for n, r in removed],
                "deleted": deleted,
                "preserved": preserved,
            },
            ctx.out,
        )
        return ExitCode.OK

    hours = policy.keep_checkpoint_every_n_hours
    if composed is None:
        ctx.echo(
            f"{listing.url}: max_to_keep={policy.max_to_keep}, "
            f"keep_checkpoint_every_n_hours={'None' if hours is None else f'{hours:g}'}"
        )
    else:
        ctx.echo(f"{listing.url}: retention={composed} (the latest checkpoint is always kept)")
    if actions:
        rows = [
            [a.name, a.action.upper() if a.action != "keep" else "keep", a.reason] for a in actions
        ]
        ctx.echo(table(rows, indent="  "))
    else:
        ctx.echo("  no checkpoints")
    if removed:
        ctx.echo("left by interrupted saves (a manager removes these when it opens the directory):")
        ctx.echo(table([[n, r] for n, r in removed], indent="  "))
    size = sum(a.size for a in doomed)
    if args.dry_run:
        ctx.echo(
            f"dry run: nothing changed; would delete {len(doomed)} checkpoints "
            f"({format_bytes(size)}) and {len(removed)} leftover files"
        )
    else:
        ctx.echo(
            f"deleted {len(deleted)} checkpoints ({format_bytes(size)}), preserved "
            f"{len(preserved)}, removed {len(removed)} leftover files"
        )
    return ExitCode.OK
