"""Run every atheris harness for a while and summarise: executions, coverage, findings.

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/run.py --seconds 180 [--jobs 2] [--out /tmp/anyckpt-fuzz] [NAMES...]

Seeds (valid checkpoints of every format, state files) are written into each harness's corpus
directory first; the corpus grows under ``--out`` and is reused by later runs. libFuzzer runs
each harness with ``-timeout=10`` (an input taking longer is a hang), ``-rss_limit_mb=2048`` and
``-malloc_limit_mb=512`` (a single allocation that large from an input of at most
``-max_len`` bytes is a finding), and stops at the first finding, leaving ``crash-*``,
``timeout-*`` or ``oom-*`` files in the output directory. The summary is ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HARNESSES = ["fuzz_table", "fuzz_v2_index", "fuzz_v1", "fuzz_state_file", "fuzz_plugins"]
MAX_LEN = 65536


def _checkpoints(fmt: str) -> list[dict[str, bytes]]:
    """A few small valid checkpoints in ``fmt``: file name -> bytes."""
    import anyckpt

    states = [
        {"x": np.arange(6, dtype=np.float32).reshape(2, 3)},
        {
            "a/kernel": np.linspace(0, 1, 12).reshape(3, 4),
            "a/bias": np.arange(4, dtype=np.int64),
            "flag": np.array([True, False]),
            "half": np.ones(3, dtype=np.float16),
        },
        {"names": np.array([b"alpha", b"", b"\xff"], dtype=object), "n": np.array(3)},
        {
            "p": anyckpt.Partitioned.from_full(
                np.arange(12.0).reshape(6, 2), [[(0, 3), (0, 2)], [(3, 3), (0, 2)]]
            )
        },
    ]
    out = []
    for state in states:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                paths = anyckpt.sync.save(f"{tmp}/model", state, format=fmt)
            except (anyckpt.CheckpointError, TypeError, ValueError):
                continue
            out.append({Path(p).name: Path(p).read_bytes() for p in paths})
    return out


def seed(corpus: Path, harness: str) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    if harness == "fuzz_table":
        seeds = [f["model.index"] for f in _checkpoints("v2")]
    elif harness == "fuzz_v2_index":
        for files in _checkpoints("v2"):
            data = next(v for k, v in files.items() if ".data-" in k)[:65535]
            seeds.append(len(data).to_bytes(2, "little") + data + files["model.index"])
    elif harness == "fuzz_v1":
        seeds = [f["model"] for f in _checkpoints("v1")]
    elif harness == "fuzz_state_file":
        from anyckpt.codecs.state_file import CheckpointState, encode_state

        seeds = [
            encode_state(CheckpointState("ckpt-3", ("ckpt-2", "ckpt-3"), (1.0, 2.0), 0.5)),
            encode_state(CheckpointState("/root/ckpts/model.ckpt-9", ("../x", "s3://b/k"))),
            b'model_checkpoint_path: "a"\n# comment\nall_model_checkpoint_paths: ["a", "b"]\n',
        ]
    elif harness == "fuzz_plugins":
        for fmt, tag in (("safetensors", b"\x00"), ("zstd", b"\x01")):
            seeds += [tag + next(iter(f.values())) for f in _checkpoints(fmt)]
    for i, data in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(data[:MAX_LEN])
    return len(seeds)


def run_one(harness: str, seconds: int, out: Path) -> dict[str, object]:
    corpus = out / "corpus" / harness
    seeds = seed(corpus, harness)
    artifacts = out / "findings" / harness
    artifacts.mkdir(parents=True, exist_ok=True)
    log = out / f"{harness}.log"
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(
            [
                sys.executable,
                str(HERE / f"{harness}.py"),
                str(corpus),
                f"-max_total_time={seconds}",
                f"-max_len={MAX_LEN}",
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-malloc_limit_mb=512",
                f"-artifact_prefix={artifacts}/",
                "-print_final_stats=1",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=HERE,
        )
    text = log.read_text(errors="replace")
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    done = re.findall(r"Done (\d+) runs in (\d+) second", text)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    findings = sorted(p.name for p in artifacts.iterdir())
    return {
        "harness": harness,
        "seconds": round(time.monotonic() - started),
        "executions": int(execs[-1]) if execs else (int(done[-1][0]) if done else None),
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus_files": len(list(corpus.iterdir())),
        "seeds": seeds,
        "exit_code": proc.returncode,
        "findings": findings,
        "log": str(log),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=HARNESSES)
    parser.add_argument("--seconds", type=int, default=180)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/anyckpt-fuzz"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda h: run_one(h, args.seconds, args.out), args.names))
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(
            f"{r['harness']:18} {r['executions']!s:>10} execs  cov {r['coverage_edges']!s:>6}  "
            f"corpus {r['corpus_files']:>5}  findings {len(r['findings'])}  exit {r['exit_code']}"  # type: ignore[arg-type]
        )
    return 1 if any(r["findings"] or r["exit_code"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
