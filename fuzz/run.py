"""Run every atheris harness for a while and summarise: executions, coverage, findings.

    .venv/bin/pip install atheris           # or: pip install -e '.[fuzz]'
    .venv/bin/python fuzz/run.py --seconds 180 [--jobs 2] [--out /tmp/anyckpt-fuzz] [NAMES...]
    .venv/bin/python fuzz/run.py --smoke    # what `make fuzz-smoke` (and `make test`) runs
    .venv/bin/python fuzz/run.py --update-seeds   # rewrite fuzz/corpus/*/seed-*

Each harness starts from its committed corpus ``fuzz/corpus/HARNESS/`` (seeds: valid
checkpoints of every format, state files, meta graphs, made with anyckpt itself; and
``regress-*``: every input that ever was a finding), read-only; what it discovers goes to
``--out``/corpus/HARNESS and is reused by later runs. libFuzzer runs each harness with
``-timeout=10`` (an input taking longer is a hang), ``-rss_limit_mb=2048`` and
``-malloc_limit_mb=512`` (a single allocation that large from an input of at most ``-max_len``
bytes is a finding), and stops at the first finding, leaving ``crash-*``, ``timeout-*`` or
``oom-*`` files in the output directory. The summary is ``summary.json``. ``--smoke`` is 10 s
per harness, two at a time, in a temporary directory, failing on any finding.
"""

from __future__ import annotations

import argparse
import contextlib
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
HARNESSES = [
    "fuzz_table",
    "fuzz_v2_index",
    "fuzz_v2_checksums",
    "fuzz_v1",
    "fuzz_state_file",
    "fuzz_plugins",
    "fuzz_meta",
    "fuzz_tf2_object_graph",
]
CORPUS = HERE / "corpus"
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
        {  # the keys of a TF2 (object-based) checkpoint
            "_CHECKPOINTABLE_OBJECT_GRAPH": np.array(b"\n\x06\n\x04\x08\x01\x12\x00", dtype=object),
            "model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE": np.ones((3, 2), np.float32),
            "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.array(1, np.int64),
        },
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


def seeds(harness: str) -> list[bytes]:
    """Valid inputs for ``harness``, made with anyckpt itself."""
    out: list[bytes] = []
    if harness == "fuzz_table":
        out = [f["model.index"] for f in _checkpoints("v2")]
    elif harness in ("fuzz_v2_index", "fuzz_v2_checksums"):
        for files in _checkpoints("v2"):
            data = next(v for k, v in files.items() if ".data-" in k)[:65535]
            out.append(len(data).to_bytes(2, "little") + data + files["model.index"])
    elif harness == "fuzz_v1":
        out = [f["model"] for f in _checkpoints("v1")]
    elif harness == "fuzz_state_file":
        from anyckpt.codecs.state_file import CheckpointState, encode_state

        out = [
            encode_state(CheckpointState("ckpt-3", ("ckpt-2", "ckpt-3"), (1.0, 2.0), 0.5)),
            encode_state(CheckpointState("/root/ckpts/model.ckpt-9", ("../x", "s3://b/k"))),
            b'model_checkpoint_path: "a"\n# comment\nall_model_checkpoint_paths: ["a", "b"]\n',
        ]
    elif harness == "fuzz_plugins":
        for fmt, tag in (("safetensors", b"\x00"), ("zstd", b"\x01")):
            out += [tag + next(iter(f.values())) for f in _checkpoints(fmt)]
    elif harness == "fuzz_meta":
        out = _meta_graphs()
    elif harness == "fuzz_tf2_object_graph":
        out = _object_graphs()
    return [data[:MAX_LEN] for data in out]


def _object_graphs() -> list[bytes]:
    """Object graphs anyckpt writes: nested objects, a shared object, slot variables."""
    from anyckpt.object_graph import encode_tree

    w = np.zeros((2, 3), np.float32)
    trees = [
        {"model": {"w": w, "inner": {"b": w[0]}}, "save_counter": np.int64(1)},
        {
            "model": {
                "kernel": {
                    ".ATTRIBUTES": {"VARIABLE_VALUE": w},
                    ".OPTIMIZER_SLOT": {"optimizer": {"m": w, "v": w}},
                }
            },
            "optimizer": {"iter": np.int64(3)},
        },
    ]
    return [encode_tree(tree)[1] for tree in trees]


def _meta_graphs() -> list[bytes]:
    """.meta files of every kind anyckpt writes: V1, V2, sharded, partitioned; one as text."""
    from google.protobuf import text_format

    import anyckpt
    from anyckpt.meta import SaverConfig, build_meta_graph, encode_meta_graph

    tensors = {
        "w": np.zeros((2, 3), np.float32),
        "a/kernel": np.zeros(4, np.int64),
        "names": np.array([b"x"], dtype=object),
    }
    part = {"p": anyckpt.Partitioned.split(np.arange(12.0).reshape(6, 2), 2), "b": np.ones(2)}
    out = [
        encode_meta_graph(tensors),
        encode_meta_graph(tensors, SaverConfig(version=1, max_to_keep=None)),
        encode_meta_graph(tensors, shards=[["w"], ["a/kernel", "names"]]),
        encode_meta_graph(part, SaverConfig(version=1)),
        text_format.MessageToString(build_meta_graph({"w": tensors["w"]})).encode(),
    ]
    return out


def update_seeds(names: list[str]) -> None:
    """Rewrite ``fuzz/corpus/HARNESS/seed-*`` (``regress-*`` files are kept)."""
    for harness in names:
        corpus = CORPUS / harness
        corpus.mkdir(parents=True, exist_ok=True)
        for old in corpus.glob("seed-*"):
            old.unlink()
        made = seeds(harness)
        for i, data in enumerate(made):
            (corpus / f"seed-{i}").write_bytes(data)
        print(f"{harness}: {len(made)} seeds")


def run_one(harness: str, seconds: int, out: Path) -> dict[str, object]:
    corpus = out / "corpus" / harness
    corpus.mkdir(parents=True, exist_ok=True)
    committed = CORPUS / harness
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
                str(committed),
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
        "committed_corpus": len(list(committed.iterdir())),
        "exit_code": proc.returncode,
        "findings": findings,
        "log": str(log),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=HARNESSES)
    parser.add_argument("--seconds", type=int, default=None, help="per harness (180; smoke 10)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default /tmp/anyckpt-fuzz")
    parser.add_argument("--smoke", action="store_true", help="short run in a temporary dir")
    parser.add_argument("--update-seeds", action="store_true", help="rewrite the seeds")
    args = parser.parse_args()
    if args.update_seeds:
        update_seeds(args.names)
        return 0
    seconds = args.seconds or (10 if args.smoke else 180)
    with contextlib.ExitStack() as stack:
        out = args.out
        if out is None:
            out = (
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="anyckpt-fuzz-")))
                if args.smoke
                else Path("/tmp/anyckpt-fuzz")
            )
        out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda h: run_one(h, seconds, out), args.names))
        (out / "summary.json").write_text(json.dumps(results, indent=2))
        failed = False
        for r in results:
            print(
                f"{r['harness']:18} {r['executions']!s:>10} execs  cov {r['coverage_edges']!s:>6}  "
                f"corpus {r['corpus_files']:>5}+{r['committed_corpus']:<4} "
                f"findings {len(r['findings'])}  exit {r['exit_code']}"  # type: ignore[arg-type]
            )
            if r["findings"] or r["exit_code"]:
                failed = True
                print(Path(str(r["log"])).read_text(errors="replace")[-3000:], file=sys.stderr)
                for name in r["findings"]:  # type: ignore[union-attr]
                    print(f"  finding: {out}/findings/{r['harness']}/{name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
