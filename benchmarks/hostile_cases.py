"""Peak RSS and time of reading crafted and very large checkpoints (issue 13, defects 2 and 7).

Each (case, operation) runs in a fresh process, which reports its own peak RSS (``VmHWM`` of
``/proc/self/status``, which starts afresh at ``exec``, unlike ``ru_maxrss``; ``base`` is its value
after importing anyckpt) and the operation's wall time; an error is reported by type and
message instead of a figure.

Cases:

- ``v2_bomb``: a 0.8 MB V2 ``.index`` whose 50,000 keys share 10 KB prefixes in one restart run
  (``tests/hostile_files.py``); ``load`` and ``anyckpt inspect``.
- ``v1_bomb``: a 0.5 MB V1 file whose index block holds 20,000 separators of 20 KB; ``load``.
- ``v2_1m``: 1,000,000 float32 scalars (``t0000000`` ...) saved by anyckpt in V2;
  ``open`` (open + one ``spec``), ``keys``, ``inspect`` and ``load``.
- ``v1_300k``: 300,000 float32 scalars in V1; ``keys`` and ``load``.

Usage::

    .venv/bin/python benchmarks/hostile_cases.py                 # every case
    .venv/bin/python benchmarks/hostile_cases.py v2_bomb v2_1m   # some

The large checkpoints are built once under ``/tmp/anyckpt-hostile-cases`` (``--dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "v2_bomb": ("load", "inspect"),
    "v1_bomb": ("load",),
    "v2_1m": ("open", "keys", "inspect", "load"),
    "v1_300k": ("keys", "load"),
}


def _build(case: str, root: Path) -> str:
    """Build the case's files (once) and return its prefix."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import hostile_files
    import numpy as np

    import anyckpt.sync

    directory = root / case
    done = directory / "done"
    if case == "v2_bomb":
        prefix = str(directory / "bomb")
    elif case == "v1_bomb":
        prefix = str(directory / "bomb.ckpt")
    else:
        prefix = str(directory / "ckpt")
    if done.exists():
        return prefix
    directory.mkdir(parents=True, exist_ok=True)
    if case == "v2_bomb":
        hostile_files.v2_prefix_bomb(directory)
    elif case == "v1_bomb":
        hostile_files.v1_separator_bomb(directory)
    else:
        count, fmt = (1_000_000, "v2") if case == "v2_1m" else (300_000, "v1")
        one = np.zeros((), dtype=np.float32)
        anyckpt.sync.save(prefix, {f"t{i:07d}": one for i in range(count)}, format=fmt)
    done.touch()
    return prefix


def _peak_kib() -> int:
    """This process's peak RSS (VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(op: str, prefix: str) -> None:
    import anyckpt.cli
    import anyckpt.sync

    base = _peak_kib()
    start = time.perf_counter()
    try:
        if op == "load":
            n = len(anyckpt.sync.load(prefix))
        elif op == "inspect":  # the listing written to /dev/null (as to a pipe)
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                status = anyckpt.cli.main(["inspect", prefix])
            n = 1
            if status:
                raise RuntimeError(f"exit status {status}")
        else:
            with anyckpt.sync.open(prefix) as reader:
                if op == "keys":
                    n = len(reader.keys())
                else:
                    reader.spec("t0000000")
                    n = 1
        result: dict[str, object] = {"n": n}
    except Exception as exc:  # the figure is the error
        result = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    result["seconds"] = time.perf_counter() - start
    result["peak_mib"] = _peak_kib() / 1024
    result["base_mib"] = base / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", metavar="CASE", help=", ".join(CASES))
    parser.add_argument("--dir", default="/tmp/anyckpt-hostile-cases", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("OP", "PREFIX"), help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:  # in a process of its own: building 1M tensors takes ~1 GB
        print(_build(args.build, args.dir))
        return
    if args.child:
        _child(*args.child)
        return
    print("| case | operation | file MB | peak RSS MiB (after import) | time s | result |")
    print("|---|---|---|---|---|---|")
    for case in args.cases or CASES:
        if case not in CASES:
            parser.error(f"unknown case {case!r}")
        build = [sys.executable, __file__, "--build", case, "--dir", str(args.dir)]
        prefix = subprocess.run(build, capture_output=True, text=True, check=True).stdout.strip()
        size = sum(f.stat().st_size for f in Path(prefix).parent.iterdir()) / 1e6
        for op in CASES[case]:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", op, prefix],
                capture_output=True,
                text=True,
                env=os.environ,
                check=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            peak = f"{r['peak_mib']:.0f} ({r['peak_mib'] - r['base_mib']:.0f})"
            outcome = r.get("error") or f"ok ({r['n']})"
            print(f"| {case} | {op} | {size:.2f} | {peak} | {r['seconds']:.2f} | {outcome} |")


if __name__ == "__main__":
    main()
