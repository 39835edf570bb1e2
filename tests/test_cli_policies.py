"""``anyckpt prune`` with composable policies and ``--explain``; ``anyckpt ls`` shows the
metrics recorded per checkpoint (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_cli import run

import anyckpt


def make_run(root: Path) -> None:
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.8}
    with anyckpt.sync.CheckpointManager(root, max_to_keep=None) as manager:
        for step, loss in losses.items():
            manager.save({"w": np.full(4, step)}, step=step, metrics={"loss": loss})


def row_of(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.split()[:1] == [name])


def test_ls_shows_metrics(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    text = run("ls", str(root))
    assert text.returncode == 0, text.stderr
    assert "METRICS" in text.stdout.splitlines()[1]
    assert row_of(text.stdout, "5").endswith("loss=0.8")
    assert "metrics.json" not in text.stdout  # a checkpoint's file, not an "other" file
    doc = json.loads(run("ls", str(root), "--json").stdout)
    by_name = {c["name"]: c for c in doc["checkpoints"]}
    assert by_name["ckpt-2"]["metrics"] == {"loss": 0.1}
    assert "ckpt-2.metrics.json" in [f["name"] for f in by_name["ckpt-2"]["files"]]


def test_ls_without_metrics_has_no_metrics_column(tmp_path: Path) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save({"w": np.zeros(2)}, step=1)
    assert "METRICS" not in run("ls", str(tmp_path)).stdout


def test_ls_names_an_orphaned_sidecar_and_an_unreadable_one(tmp_path: Path) -> None:
    make_run(tmp_path)
    (tmp_path / "ckpt-9.metrics.json").write_text('{"metrics": {}}')
    (tmp_path / "ckpt-3.metrics.json").write_text("{broken")
    out = run("ls", str(tmp_path)).stdout
    assert "ckpt-9.metrics.json" in out
    assert "metrics of a checkpoint not on disk" in out
    assert "unreadable: ckpt-3.metrics.json" in out


def test_prune_explain_names_the_policy_that_keeps_each(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    dry = run("prune", str(root), "--max-to-keep", "1", "--keep-best", "1:loss", "--explain", "-n")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert "retention=Any(LatestN(1), BestN(1, 'loss', 'min'))" in out
    assert "BestN(1, 'loss', 'min'): loss=0.1, one of the best 1" in row_of(out, "ckpt-2")
    assert "latest checkpoint: always kept" in row_of(out, "ckpt-5")
    three = row_of(out, "ckpt-3")
    assert "DELETE" in three
    assert "LatestN(1): beyond the newest 1 (5 tracked)" in three
    assert "loss=0.5 is not among the best 1 (min)" in three
    assert len(list(root.glob("*.index"))) == 5  # a dry run

    real = json.loads(
        run("prune", str(root), "--max-to-keep", "1", "--keep-best", "1:loss", "--json").stdout
    )
    assert real["deleted"] == ["ckpt-1", "ckpt-3", "ckpt-4"]
    assert sorted(p.name for p in root.glob("*.metrics.json")) == [
        "ckpt-2.metrics.json",
        "ckpt-5.metrics.json",
    ]


def test_prune_explain_with_tf_options_alone_keeps_tf_decisions(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    plain = json.loads(run("prune", str(root), "--max-to-keep", "2", "-n", "--json").stdout)
    explained = json.loads(
        run("prune", str(root), "--max-to-keep", "2", "--explain", "-n", "--json").stdout
    )
    assert {a["name"]: a["action"] for a in plain["actions"]} == {
        a["name"]: a["action"] for a in explained["actions"]
    }
    reasons = {a["name"]: a["reason"] for a in explained["actions"]}
    assert reasons["ckpt-4"] == "LatestN(2): one of the newest 2"


def test_prune_other_policies(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    doc = json.loads(
        run(
            "prune",
            str(root),
            "--max-to-keep",
            "1",
            "--every-n-steps",
            "2",
            "--keep-steps",
            "1",
            "-n",
            "--json",
        ).stdout
    )
    actions = {a["name"]: a["action"] for a in doc["actions"]}
    assert actions == {
        "ckpt-1": "keep",
        "ckpt-2": "keep",
        "ckpt-3": "delete",
        "ckpt-4": "keep",
        "ckpt-5": "keep",
    }
    ttl = json.loads(run("prune", str(root), "--keep-for", "1e9", "-n", "--json").stdout)
    assert all(a["action"] == "keep" for a in ttl["actions"])


def test_prune_refuses_bad_policy_options(tmp_path: Path) -> None:
    for bad in (["--keep-best", "x"], ["--keep-best", "0:loss"], ["--keep-steps", "a"]):
        result = run("prune", str(tmp_path), *bad)
        assert result.returncode == 2, (bad, result.stderr)
