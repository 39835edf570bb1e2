"""No input may make anyckpt allocate far more than its own size plus the tensors asked for
(issue 13).

For every crafted attack registered in tests/hostile_cases.py and every input of the committed
fuzz corpus (fuzz/corpus/HARNESS/: seeds and every past finding), run in a fresh process:

    peak allocation <= 2 x input bytes + bytes of the tensors returned + CONSTANT

measured twice: by tracemalloc (Python objects and NumPy arrays, exactly) and by the RSS
high-water mark (everything, C libraries included: protobuf's parser, zstd's buffers); for a
text-format protobuf graph (``.meta``) the RSS bound is PROTOBUF_RSS_FACTOR x its size instead
of 2x, the size of protobuf's own in-memory messages (a documented limit; a binary ``.meta`` is
read one node at a time and held to 2x). And the
tensors one input can make anyckpt return are at most MAX_AMPLIFICATION x its size: only the
zstd plugin stores tensors compressed, and it refuses chunks over its ratio limit. A refusal
(a CheckpointError) is a fine outcome; the bound holds up to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from anyckpt_zstd.codec import DEFAULT_MAX_RATIO
from hostile_cases import (
    CASES,
    FUZZ_DIR,
    PROTOBUF_ACTIONS,
    PROTOBUF_RSS_FACTOR,
    Case,
    files_bytes,
    read_as_text_meta,
)

#: The constant of the bound (docs/reliability.md, "Hostile input").
CONSTANT = 8 << 20
#: Tensor bytes per input byte one file can make anyckpt return (the zstd ratio limit).
MAX_AMPLIFICATION = DEFAULT_MAX_RATIO
PROBE = Path(__file__).resolve().parent.parent / "hostile_cases.py"
CORPUS = FUZZ_DIR / "corpus"
HARNESSES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def _probe(*args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, str(PROBE), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(
    name: str, kind: str, size: int, result: dict[str, Any], tensors: int, path: Path
) -> None:
    bound = 2 * size + result["asked"] + CONSTANT
    assert result["traced_peak"] <= bound, (name, result, bound)
    if result["rss_peak"] is not None:
        if kind in PROTOBUF_ACTIONS and read_as_text_meta(path):
            # protobuf's own messages for a text-format graph, in C (docs/reliability.md)
            bound = PROTOBUF_RSS_FACTOR * size + result["asked"] + CONSTANT
        assert result["rss_peak"] <= bound, (name, result, bound)
    assert tensors <= MAX_AMPLIFICATION * size + CONSTANT, (name, result)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crafted_case_stays_within_the_bound(case: Case, tmp_path: Path) -> None:
    path = case.build(tmp_path)
    size = files_bytes(path)
    (result,) = _probe("measure", case.action, str(path))
    # A read returns each tensor about twice (all of it, then rows 1:).
    _check(case.name, case.action, size, result, result["asked"] // 2, path)


def test_every_issue_13_attack_of_this_module_is_registered() -> None:
    names = {c.name for c in CASES}
    assert {"meta-const-bomb", "zstd-ratio-bomb", "zstd-ratio-bomb-one-chunk"} <= names


@pytest.mark.parametrize("harness", HARNESSES)
def test_corpus_stays_within_the_bound(harness: str) -> None:
    files = sorted(str(p) for p in (CORPUS / harness).iterdir() if p.is_file())
    assert files, f"no corpus for {harness}"
    results = _probe("corpus", harness, *files)
    assert [r["path"] for r in results] == files
    for result in results:
        _check(
            result["path"],
            harness,
            result["size"],
            result,
            result["asked"] // 2,
            Path(result["path"]),
        )
