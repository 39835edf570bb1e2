"""Measure how long the event loop stalls while the first S3 manager of a process opens,
saves and restores (issue #19): a 1 ms ticker on the loop records the longest gap of each
phase, in a fresh process each run, against a moto S3 server (tests/servers.py).

    PYTHONPATH=src .venv/bin/python tools/loop_gaps.py [--runs 5] [--why]

``--why``: a watchdog thread samples the loop thread's stack whenever a tick is over 10 ms
late, and the script prints where the loop was for the longest gaps."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROBE = r"""
import asyncio, json, sys, threading, time, traceback
import numpy as np
import anyckpt
CheckpointManager = anyckpt.CheckpointManager  # imported up front, as a trainer does

samples, last, phase, loop_thread = [], [time.perf_counter()], ["idle"], threading.get_ident()
config = json.loads(sys.argv[3])
why = config["why"]
long_calls = []  # C calls over 3 ms in threads other than the loop's: (ms, phase, name, where)

def c_call_profiler():
    # Times each C call that runs no Python code inside it: one that does not release the
    # GIL (json.loads, marshal.loads, ...) holds it for all that time.
    local = threading.local()

    def profile(frame, event, arg):
        stack = getattr(local, "stack", None)
        if stack is None:
            stack = local.stack = []
        if event == "c_call":
            stack.append([time.perf_counter(), True])
        elif event in ("c_return", "c_exception") and stack:
            start, pure = stack.pop()
            took = time.perf_counter() - start
            if pure and took > 0.003:
                name = f"{getattr(arg, '__module__', None) or ''}.{arg.__qualname__}"
                where = f"{frame.f_code.co_filename.split('site-packages/')[-1]}:{frame.f_lineno}"
                long_calls.append((round(took * 1000, 1), phase[0], name, where))
        elif event == "call":
            for entry in stack:
                entry[1] = False  # Python code ran inside: not one C stretch
    return profile

def watchdog():
    seen, me = None, threading.get_ident()
    while True:
        time.sleep(0.002)
        late = time.perf_counter() - last[0]
        if late > 0.010 and phase[0] != "idle":  # (idle: before the loop, e.g. preloading)
            frame = sys._current_frames().get(loop_thread)
            stack = traceback.extract_stack(frame) if frame is not None else []
            where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                     for f in stack][-14:]
            others = [
                f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                for t, top in sys._current_frames().items() if t not in (loop_thread, me)
                for f in traceback.extract_stack(top)[-1:]
            ]
            key = (last[0], where[-1] if where else "")
            if key != seen:
                samples.append({"phase": phase[0], "late_ms": round(late * 1000, 1),
                                "at": where, "others": others})
                seen = key

async def main(url, options):
    gaps = {}
    if config["c_calls"]:
        threading.setprofile(c_call_profiler())

    done = asyncio.Event()

    async def tick():
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps[phase[0]] = max(gaps.get(phase[0], 0.0), now - last[0])
            last[0] = now

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    phase[0] = "open"
    async with CheckpointManager(url, storage_options=options, durable=False) as m:
        phase[0] = "save"
        await (await m.save({"w": np.arange(1000.0)}, 1))
        phase[0] = "restore"
        await m.restore()
        phase[0] = "close"
    await asyncio.sleep(0.01)
    done.set()
    await task
    return {k: round(v * 1000, 1) for k, v in gaps.items() if k != "idle"}

if why:
    threading.Thread(target=watchdog, daemon=True).start()
if config["preload"]:  # as docs/storage.md recommends: before the event loop starts
    anyckpt.storage.preload(sys.argv[1], json.loads(sys.argv[2]))
gaps = asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
threading.setprofile(None)
long_calls = [c for c in long_calls if not c[2].endswith(("sleep", "select", ".wait", "acquire"))]
print(json.dumps({"gaps_ms": gaps, "samples": samples, "long_calls": long_calls}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--why", action="store_true")
    parser.add_argument(
        "--c-calls",
        action="store_true",
        help="time every C call of the worker threads; list those over 3 ms (GIL holders)",
    )
    parser.add_argument(
        "--preload", action="store_true", help="call anyckpt.storage.preload before the loop"
    )
    args = parser.parse_args()
    config = {"why": args.why, "c_calls": args.c_calls, "preload": args.preload}
    import tempfile

    import servers

    server = servers.ServerProcess("s3", Path(tempfile.mkdtemp()) / "moto.log")
    endpoint = server.start()
    os.environ.update(servers._aws_env(endpoint))
    try:
        with servers._bucket("s3", servers.s3_storage_options(endpoint)) as bucket:
            runs = []
            path = os.pathsep.join([str(ROOT / "src"), *sys.path])
            for i in range(args.runs):
                out = subprocess.run(
                    [sys.executable, "-c", PROBE, f"{bucket.url}/run{i}",
                     json.dumps(bucket.storage_options), json.dumps(config)],
                    capture_output=True, text=True, timeout=300,
                    env={**os.environ, "PYTHONPATH": path},
                )  # fmt: skip
                if out.returncode:
                    raise SystemExit(out.stderr)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append(result["gaps_ms"])
                print(f"run {i + 1}: {result['gaps_ms']}")
                for took, phase, name, where in sorted(result["long_calls"], reverse=True)[:12]:
                    print(f"  {phase}: {took} ms in C {name} (called at {where})")
                for sample in sorted(result["samples"], key=lambda s: -s["late_ms"])[:4]:
                    print(f"  {sample['phase']} {sample['late_ms']} ms late at:")
                    for line in sample["at"]:
                        print(f"      {line}")
                    for line in sample["others"]:
                        print(f"    other thread at {line}")
            for phase in runs[0]:
                values = [r.get(phase, 0.0) for r in runs]
                print(f"{phase}: median {statistics.median(values)} ms, max {max(values)} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
