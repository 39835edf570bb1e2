"""What a training job leaves on an object store, against the real S3 server (moto, in its own
process: tests/servers.py): unfinished multipart uploads of a killed process, a leftover lock;
and batched ranged reads (requests counted, not timed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from servers import RemoteBucket

import anyckpt
import anyckpt.sync
from anyckpt.cli import main as cli_main
from anyckpt.lease import MACHINE
from anyckpt.storage import Storage, preload

ROOT = Path(__file__).resolve().parents[1]


def ls_json(url: str, options: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> Any:
    code = cli_main(["ls", "--json", url, *_opts(options)])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def _opts(options: dict[str, Any]) -> list[str]:
    args = []
    for key, value in options.items():
        args += ["-o", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def start_upload(fs: Any, key: str, data: bytes) -> str:
    """A multipart upload with one part sent, never completed: what a crash leaves."""
    bucket, path = key.split("/", 1)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=path)["UploadId"]
    fs.call_s3("upload_part", Bucket=bucket, Key=path, UploadId=upload, PartNumber=1, Body=data)
    return str(upload)


def uploads(fs: Any, bucket: str) -> list[str]:
    found = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    return sorted(str(u["Key"]) for u in found)


KILLED_WRITER = """
import sys
import anyckpt.storage as s
import anyckpt.storage.s3
s.s3.S3_SINGLE_PUT_MAX = 1 << 20
s.s3.S3_PART_SIZE = 5 << 20
storage, path = s.Storage.from_url(sys.argv[1], {options})
writer = storage.open_writer(path)
writer.write(bytes(12 << 20))   # two 5 MiB parts sent, 2 MiB held
for part in writer._parts:
    part.result()
print("SENT", flush=True)
import time; time.sleep(600)    # killed here, mid-upload
"""


def test_a_killed_uploads_are_listed_and_aborted_by_the_manager(
    s3_bucket: RemoteBucket, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = s3_bucket.filesystem()
    run = f"{s3_bucket.url}/run"
    opts = s3_bucket.storage_options
    anyckpt.sync.save(f"{run}/ckpt-1", {"w": np.arange(3.0)}, storage_options=opts)

    # A real one: a process SIGKILLed in the middle of a multipart upload of a data file.
    code = KILLED_WRITER.format(options=repr(opts))
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), f"{run}/ckpt-2.data-00000-of-00001"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "SENT"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # And as a crashed process leaves them, through the S3 API: the state file, another
    # name (not the manager's), and one in a subdirectory (not this directory's).
    start_upload(fs, f"{s3_bucket.name}/run/checkpoint", b"x" * 100)
    start_upload(fs, f"{s3_bucket.name}/run/notes.bin", b"y" * 200)
    start_upload(fs, f"{s3_bucket.name}/run/sub/ckpt-3.index", b"z" * 10)

    listing = ls_json(run, opts, capsys)
    found = {u["name"]: u for u in listing["uploads"]}
    assert sorted(found) == ["checkpoint", "ckpt-2.data-00000-of-00001", "notes.bin"]
    assert found["ckpt-2.data-00000-of-00001"]["size"] == 10 << 20  # the two parts sent
    assert found["notes.bin"]["size"] == 200
    # (moto reports one fixed date, 2010-11-10, for every upload's start: S3 the real one)
    assert all(0 < u["initiated"] <= time.time() for u in found.values())
    assert [c["name"] for c in listing["checkpoints"]] == ["ckpt-1"]  # invisible to listings
    code = cli_main(["ls", run, *_opts(opts)])
    text = capsys.readouterr().out
    assert code == 0
    assert "unfinished multipart uploads" in text
    line = next(x for x in text.splitlines() if "ckpt-2.data-00000-of-00001" in x)
    assert "10.0 MiB" in line
    assert "started" in line
    assert "ago" in line

    with anyckpt.sync.CheckpointManager(run, storage_options=opts):
        pass  # opening the directory aborts the uploads of an interrupted save of its own
    assert uploads(fs, s3_bucket.name) == ["run/notes.bin", "run/sub/ckpt-3.index"]


def test_prune_aborts_unfinished_uploads(
    s3_bucket: RemoteBucket, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = s3_bucket.filesystem()
    run = f"{s3_bucket.url}/run"
    opts = s3_bucket.storage_options
    with anyckpt.sync.CheckpointManager(run, storage_options=opts) as manager:
        manager.save({"w": np.arange(3.0)}, 1).wait()
    start_upload(fs, f"{s3_bucket.name}/run/ckpt-2.index", b"i" * 50)

    assert cli_main(["prune", "--dry-run", "--json", run, *_opts(opts)]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert {"name": "ckpt-2.index", "reason": "unfinished multipart upload (50 B)"} in planned[
        "debris"
    ]
    assert uploads(fs, s3_bucket.name) == ["run/ckpt-2.index"]  # a dry run changes nothing
    assert cli_main(["prune", run, *_opts(opts)]) == 0
    assert "ckpt-2.index" in capsys.readouterr().out
    assert uploads(fs, s3_bucket.name) == []


def _lock_record(**fields: Any) -> bytes:
    now = time.time()
    record = {"anyckpt": "directory lock", "owner": "0" * 32, "host": "trainer-7", "pid": 4242}
    record.update({"machine": "elsewhere", "acquired": now - 3600, "renewed": now - 5})
    record.update({"expires": now + 55})
    record.update(fields)
    return json.dumps(record).encode()


def test_ls_describes_a_leftover_lease(
    s3_bucket: RemoteBucket, capsys: pytest.CaptureFixture[str]
) -> None:
    run = f"{s3_bucket.url}/run"
    opts = s3_bucket.storage_options
    storage, root = Storage.from_url(run, opts)
    anyckpt.sync.save(f"{run}/ckpt-1", {"w": np.arange(3.0)}, storage_options=opts)
    storage.write_bytes(f"{root}/checkpoint.lock", _lock_record())

    lock = ls_json(run, opts, capsys)["lock"]
    assert lock["holder"]["host"] == "trainer-7"
    assert lock["holder"]["pid"] == 4242
    assert lock["lease"] is True
    assert lock["expired"] is False
    assert lock["running"] is None  # another machine: cannot tell
    assert "the next open fails if its holder renews it" in lock["next_open"]
    assert cli_main(["ls", run, *_opts(opts)]) == 0
    text = capsys.readouterr().out
    assert "checkpoint.lock: lease held by process 4242 on trainer-7" in text
    assert "not expired" in text
    assert "checkpoint.lock" not in text.split("other files:")[-1] or "other files" not in text

    # Expired: the next open watches it for one term, then takes it over (as ls says).
    storage.write_bytes(f"{root}/checkpoint.lock", _lock_record(expires=time.time() - 30))
    lock = ls_json(run, opts, capsys)["lock"]
    assert lock["expired"] is True
    assert "takes it over if it stays unchanged" in lock["next_open"]
    with anyckpt.sync.CheckpointManager(run, storage_options=opts, lease_seconds=0.5) as m:
        assert m.latest_checkpoint is None  # opened: the lease was taken over


def test_ls_describes_a_leftover_local_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anyckpt.sync.save(tmp_path / "ckpt-1", {"w": np.arange(3.0)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no longer running, on this machine
    (tmp_path / "checkpoint.lock").write_bytes(_lock_record(machine=MACHINE, pid=dead.pid))
    assert cli_main(["ls", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"checkpoint.lock: lock held by process {dead.pid} on trainer-7" in text
    assert "process no longer running" in text
    assert "the next open takes it" in text
    with anyckpt.sync.CheckpointManager(tmp_path):
        pass  # and it does


# -- batched ranged reads ------------------------------------------------------------------


class _Requests:
    def __init__(self, fs: Any) -> None:
        self.methods: list[str] = []
        fs.s3.meta.events.register("before-send.s3", self._seen)

    def _seen(self, request: Any, **kwargs: Any) -> None:
        self.methods.append(str(request.method))


def _count(storage: Storage) -> _Requests:
    import fsspec.asyn

    fsspec.asyn.sync(storage.fs.loop, storage.fs.set_session)
    return _Requests(storage.fs)


def test_read_ranges_on_s3_coalesces_nearby_ranges(s3_bucket: RemoteBucket) -> None:
    storage, root = Storage.from_url(s3_bucket.url, s3_bucket.storage_options)
    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    storage.write_bytes(f"{root}/blob", data)
    ranges = [(0, 10), (100, 50), (2 << 20, 7), (50, 60), (len(data) - 5, 5), (7, 0)]
    counter = _count(storage)
    reader = storage.open_reader(f"{root}/blob")
    counter.methods.clear()
    views = reader.read_ranges(ranges)
    assert [bytes(v) for v in views] == [data[o : o + n] for o, n in ranges]
    # Those within 1 MiB of each other share a request: [0, 150) and [2 MiB, 3 MiB), sent
    # concurrently.
    assert counter.methods == ["GET", "GET"]
    with pytest.raises(anyckpt.CorruptCheckpointError, match="past the end"):
        reader.read_ranges([(len(data) - 1, 2)])


@pytest.mark.parametrize("fmt", ["safetensors", "zstd"])
def test_a_plugin_load_on_s3_is_a_few_requests(s3_bucket: RemoteBucket, fmt: str) -> None:
    rng = np.random.default_rng(2)
    tensors = {f"t{i:03d}": rng.standard_normal(int(rng.integers(1, 4000))) for i in range(200)}
    prefix = f"{s3_bucket.url}/m/ckpt-1"
    opts = s3_bucket.storage_options
    anyckpt.sync.save(prefix, tensors, format=fmt, storage_options=opts)
    storage, _ = Storage.from_url(prefix, opts)
    counter = _count(storage)
    with anyckpt.sync.open(prefix, storage_options=opts) as reader:
        counter.methods.clear()
        loaded = reader.read_many()
        # one HEAD for the size, one GET for all 200 tensors (was 200 GETs, or 200 + 200 HEADs)
        assert counter.methods.count("GET") == 1
        assert len(counter.methods) <= 2
    assert all(loaded[k].tobytes() == v.tobytes() for k, v in tensors.items())


# -- the event loop ------------------------------------------------------------------------

LOOP_PROBE = """
import asyncio, json, sys, threading, time
import numpy as np

first_imports = {}  # module -> thread of its first import
phase = ["idle"]
loop_imports = []  # (phase, module) imported on the loop thread while the manager worked
data_files = []  # (phase, name) of botocore's JSON data files read (one parse each)

def hook(event, args):
    if event == "open" and "botocore" in str(args[0]) and ".json" in str(args[0]):
        data_files.append((phase[0], str(args[0]).rsplit("/", 1)[-1]))
    if event != "import":
        return
    if args[0].split(".")[0] in ("s3fs", "aiobotocore", "botocore"):
        first_imports.setdefault(args[0], threading.get_ident())
    if phase[0] != "idle" and threading.get_ident() == main_thread:
        loop_imports.append((phase[0], args[0]))

main_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
sys.addaudithook(hook)
import anyckpt
import anyckpt.storage
CheckpointManager = anyckpt.CheckpointManager  # imported up front, as a trainer does

assert "s3fs" not in sys.modules and "botocore" not in sys.modules
opened_on = []
from_url = anyckpt.storage.Storage.from_url.__func__

def spy(cls, *args, **kwargs):
    opened_on.append(threading.get_ident())
    return from_url(cls, *args, **kwargs)

anyckpt.storage.Storage.from_url = classmethod(spy)
preloaded = sys.argv[3].startswith("preload")
if preloaded:  # as docs/storage.md recommends: before the event loop starts
    anyckpt.storage.preload(sys.argv[1], json.loads(sys.argv[2]))

async def main(url, options):
    gaps, last = {}, [time.perf_counter()]
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
        restored = await m.restore()
        phase[0] = "close"
    await asyncio.sleep(0.01)
    phase[0] = "idle"
    done.set()
    await task
    assert restored["w"].tolist() == list(np.arange(1000.0))
    return {k: round(v * 1000, 1) for k, v in gaps.items() if k != "idle"}

gaps = asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
print(json.dumps({
    "on_loop": sorted(m for m, t in first_imports.items() if t == main_thread),
    "imported": sorted(first_imports),
    "loop_imports": loop_imports,
    "data_files": data_files,
    "opened_on_loop": sum(t == main_thread for t in opened_on[preloaded:]),
    "opened": len(opened_on),
    "gaps_ms": gaps,
}))
"""

#: The longest the event loop may stall while a preloaded S3 manager opens, saves and
#: restores. Generous: on an idle machine the gaps are ~5-10 ms (a GIL switch interval is
#: 5 ms), but these tests share a loaded machine with other processes, whose scheduling adds
#: its own delays. What it catches is the work that cannot be interrupted: one botocore
#: JSON file parsed (30-120 ms under load), a module imported on the loop.
PRELOADED_GAP_BOUND_MS = 50.0


def run_loop_probe(bucket: RemoteBucket, mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            LOOP_PROBE,
            f"{bucket.url}/{mode}",
            json.dumps(bucket.storage_options),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])},
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_opening_s3_storage_happens_off_the_event_loop(s3_bucket: RemoteBucket) -> None:
    """The first S3 manager imports s3fs, aiobotocore and botocore and makes the client
    (~0.2 s): in a worker thread, never on the loop. Structural (the thread of each first
    import, by an audit hook; the thread constructing the storage), not timed: without
    :func:`anyckpt.storage.preload` the loop still stalls while botocore parses its JSON
    data in one C call holding the GIL (docs/storage.md), so the gaps are printed only."""
    result = run_loop_probe(s3_bucket, "cold")
    print("event-loop gaps (ms), first S3 manager, not preloaded:", result["gaps_ms"])
    print("botocore data files parsed:", result["data_files"])
    assert "s3fs.core" in result["imported"]  # (fsspec imports the package by importlib)
    assert "aiobotocore" in result["imported"]
    assert result["on_loop"] == []  # none of them imported on the loop thread
    assert result["opened"] >= 1
    assert result["opened_on_loop"] == 0
    assert result["loop_imports"] == []  # nor anything else while opening, saving, restoring
    assert any(f[0] == "open" and f[1].startswith("service-2") for f in result["data_files"])


def test_a_preloaded_s3_manager_never_stalls_the_event_loop(s3_bucket: RemoteBucket) -> None:
    """Issue #19: with the protocol preloaded before the loop starts (as docs/storage.md
    recommends), a 1 ms ticker on the loop sees no gap over PRELOADED_GAP_BOUND_MS while the
    manager opens, saves and restores against S3.

    The guard is structural first, in every attempt: nothing is imported on the loop's
    thread while it runs, and no botocore data file is parsed after preload() (each parse is
    one C call holding the GIL, 15-150 ms: the stall preloading removes). The timing bound is
    generous on purpose (see its comment; this is not a benchmark): what is left after
    preloading is ordinary Python work in other threads, which hands the GIL back every
    5 ms. On this shared machine a ticker alone in a process already sees 9-47 ms gaps at
    times (the OS not scheduling it), so a fresh process is tried up to three times and one
    attempt under the bound passes; a stall that preloading failed to remove is in every
    attempt."""
    attempts = []
    for mode in ("preload", "preload-2", "preload-3"):
        result = run_loop_probe(s3_bucket, mode)
        attempts.append(result["gaps_ms"])
        print("event-loop gaps (ms), first S3 manager, preloaded:", result["gaps_ms"])
        assert "aiobotocore" in result["on_loop"]  # imported by preload(), before the loop ran
        assert result["loop_imports"] == []  # nothing imported on the loop while it ran
        # botocore's JSON (service model, endpoints, rules) was parsed by preload(), not after
        assert any(f[1].startswith("service-2") for f in result["data_files"])
        assert [f for f in result["data_files"] if f[0] != "idle"] == []
        assert result["opened"] >= 2  # the preload and the manager's own open
        assert result["opened_on_loop"] == 0
        assert set(result["gaps_ms"]) >= {"open", "save", "restore"}
        worst = max(result["gaps_ms"][p] for p in ("open", "save", "restore"))
        if worst < PRELOADED_GAP_BOUND_MS:
            break
    else:
        pytest.fail(f"every attempt stalled the loop over the bound: {attempts}")


def test_preload_makes_the_client_the_manager_then_uses(s3_bucket: RemoteBucket) -> None:
    """preload("s3", options) makes the filesystem and its botocore client; opening a URL with
    the same options (from any thread) gets that filesystem, client included."""
    preload("s3", s3_bucket.storage_options)
    opened: list[Storage] = []
    thread = threading.Thread(
        target=lambda: opened.append(Storage.from_url(s3_bucket.url, s3_bucket.storage_options)[0])
    )
    thread.start()
    thread.join()
    fs = opened[0].fs
    client = fs.s3  # made by preload: set_session ran, nothing more to make
    assert client is not None
    assert Storage.from_url(f"{s3_bucket.url}/x", s3_bucket.storage_options)[0].fs is fs
    preload(f"{s3_bucket.url}/run", s3_bucket.storage_options)  # a URL too
    assert fs.s3 is client
    with pytest.raises(ValueError, match="nosuchprotocol"):
        preload("nosuchprotocol://x")


class _Served(_Requests):
    """Requests, the S3 operations, and the body bytes of each answer (its Content-Length):
    what the server sent."""

    def __init__(self, fs: Any) -> None:
        super().__init__(fs)
        self.body_bytes = 0
        self.operations: list[str] = []
        fs.s3.meta.events.register("after-call.s3", self._answered)

    def _answered(self, http_response: Any, model: Any, **kwargs: Any) -> None:
        self.operations.append(model.name)
        if model.name != "HeadObject":  # (a HEAD's Content-Length is the object's, no body)
            self.body_bytes += int(http_response.headers.get("content-length", 0))


def test_restoring_one_percent_from_s3_fetches_about_one_percent(s3_bucket: RemoteBucket) -> None:
    """issue 18: a restore of 1% of the keys of a V2 checkpoint on S3 fetches the index and
    little more than those tensors' bytes, in a bounded number of requests (ranged GETs),
    not the data file."""
    rng = np.random.default_rng(3)
    count, elements = 400, 4096  # 400 tensors of 16 KiB: a 6.4 MiB data file
    tensors = {
        f"layer{i:03d}/w": rng.standard_normal(elements).astype(np.float32) for i in range(count)
    }
    prefix = f"{s3_bucket.url}/m/ckpt-1"
    opts = s3_bucket.storage_options
    anyckpt.sync.save(prefix, tensors, storage_options=opts)
    wanted = [f"layer{i:03d}/w" for i in range(0, count, 100)]  # 1%, spread over the file
    storage, root = Storage.from_url(prefix, opts)
    index_bytes = storage.size(f"{root}.index")
    data_bytes = sum(a.nbytes for a in tensors.values())
    served = _Served(storage.fs)
    loaded = anyckpt.sync.load(prefix, wanted, storage_options=opts)
    assert sorted(loaded) == sorted(wanted)
    assert all(loaded[k].tobytes() == tensors[k].tobytes() for k in wanted)
    asked = sum(tensors[k].nbytes for k in wanted)
    print(
        f"1% restore from S3: {len(served.operations)} requests {served.operations},"
        f" {served.body_bytes} bytes served: index {index_bytes} + tensors {asked}"
        f" of a {data_bytes}-byte data file"
    )
    assert served.body_bytes <= index_bytes + asked + 4096  # (listings' answers aside)
    gets = served.operations.count("GetObject")
    assert gets <= 1 + len(wanted)  # the index, then at most one ranged GET per tensor
    assert len(served.operations) <= gets + 8  # what finding the format and sizes costs
