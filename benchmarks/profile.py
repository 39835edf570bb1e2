"""Where anyckpt's time goes: py-spy over a loop of one operation, summed by function.

    .venv/bin/python benchmarks/profile.py many_small save      # or: load, load_subset
    .venv/bin/python benchmarks/profile.py large save --scale 0.5

Runs ``--repeat`` saves (or loads) of a workload in one process under py-spy (from
``.venv-bench/peers``, which ``run.py`` creates; ``--py-spy`` to use another), sampling every
thread, and prints the share of busy samples per function: self time (the function's own
lines) and inclusive time (anywhere on the stack). Idle waits (a thread blocked on a lock,
a queue or the event loop's selector) are left out, so shares add up over the work done by
all threads together.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IDLE = ("Condition.wait", "EpollSelector.select", "SimpleQueue.get", "Event.wait", "Thread.join")

LOOP = """
import sys, anyio, anyckpt
sys.path.insert(0, {here!r})
import workloads
state = workloads.build({workload!r}, {scale!r})
subset = workloads.subset_keys(state)
prefix = {prefix!r}

async def main():
    await anyckpt.save(prefix, state, durable=False)
    await anyckpt.load(prefix)
    for _ in range({repeat}):
        if {op!r} == "save":
            await anyckpt.save(prefix, state, durable=False)
        elif {op!r} == "load":
            await anyckpt.load(prefix)
        else:
            await anyckpt.load(prefix, subset)

anyio.run(main)
"""


def summarize(raw: str, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if not frames or any(frames[-1].startswith(i) for i in IDLE):
                continue
            n = int(count)
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                anywhere[frame] += n
    lines = [f"busy samples: {total}", "", "self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive (anyckpt frames):"]
    shown = [(f, n) for f, n in anywhere.most_common() if "anyckpt" in f][:top]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in shown]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workload", choices=("large", "many_small", "mixed"))
    p.add_argument("op", choices=("save", "load", "load_subset"))
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--rate", type=int, default=1000, help="samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--py-spy", default=os.path.join(ROOT, ".venv-bench", "peers", "bin", "py-spy"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "loop.py")
        with open(script, "w") as f:
            f.write(
                LOOP.format(
                    here=HERE,
                    workload=args.workload,
                    scale=args.scale,
                    prefix=os.path.join(tmp, "ckpt"),
                    repeat=args.repeat,
                    op=args.op,
                )
            )
        raw = os.path.join(tmp, "profile.txt")
        cmd = [args.py_spy, "record", "-r", str(args.rate), "-f", "raw", "-o", raw]
        subprocess.run([*cmd, "--", sys.executable, script], check=True, capture_output=True)
        print(summarize(raw, args.top))


if __name__ == "__main__":
    main()
