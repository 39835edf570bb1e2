"""Crafted hostile checkpoints (issue 13): one builder per attack, and what a victim runs on them.

A :class:`Case` writes its files into an empty directory and returns the path its action takes:

- ``"read"``: ``anyckpt.open(path)``, every key's spec, ``read_many()``, then rows ``1:`` of
  each tensor with more than one row (what ``anyckpt.load`` and partial restores do);
- ``"inspect"``: ``anyckpt inspect --json PATH`` (which also reads ``PATH.meta`` on its own);
- ``"meta"``: ``anyckpt.read_meta_graph(PATH)``.

Register an attack with the :func:`case` decorator; tests/reliability/test_allocation_bound.py
runs every registered case in a fresh process and checks its peak allocation against
``2 x file bytes + tensors returned + a constant`` (docs/reliability.md), and other tests call
the builders directly. Each builder is deterministic and cheap (its files are small: that is
the point of an amplification attack).

``python tests/hostile_cases.py build DIR`` writes every case under ``DIR/NAME/`` and lists
them; ``... run ACTION PATH`` times one (wall seconds and peak RSS, no tracemalloc: the figures
of docs/reliability.md). ``... measure ACTION PATH`` is the probe that test runs: it prints
one JSON line with the outcome and the peaks (see :func:`measure`); ``... corpus HARNESS
FILE...`` does the same for inputs of a fuzz harness's corpus (:func:`measure_corpus`).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

import anyckpt
import anyckpt.cli
from anyckpt.codecs import DecodeError
from anyckpt.errors import CheckpointError

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
if str(FUZZ_DIR) not in sys.path:
    sys.path.insert(0, str(FUZZ_DIR))
from targets import read_everything  # noqa: E402  (one copy, in fuzz/targets.py)


@dataclass(frozen=True)
class Case:
    """One crafted attack: ``build(directory) -> path``, then ``action`` on that path."""

    name: str
    build: Callable[[Path], Path]
    action: str = "read"
    #: What the attack was before the fix (for the docs and the report).
    summary: str = ""


CASES: list[Case] = []


def case(name: str, action: str = "read", summary: str = "") -> Callable[..., Any]:
    """Register the decorated builder as a :class:`Case`."""

    def register(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
        CASES.append(Case(name, build, action, summary))
        return build

    return register


# -- defect 3: a .meta Const bomb ------------------------------------------------------------


def meta_const_bomb_bytes(elements: int = 1 << 24, assigns: int = 100) -> bytes:
    """A ~3 KB MetaGraphDef: the saver's RestoreV2 takes its tensor names and slices from
    string Consts of shape [elements] that store one value each (TensorFlow fills the rest
    with the last value), and ``assigns`` Assign nodes restore from it."""
    from anyckpt._proto.meta_graph_pb2 import MetaGraphDef

    meta = MetaGraphDef()
    nodes = meta.graph_def.node
    for name, value in (("save/names", b"w"), ("save/slices", b"")):
        const = nodes.add(name=name, op="Const")
        tensor = const.attr["value"].tensor
        tensor.dtype = 7  # DT_STRING
        tensor.tensor_shape.dim.add(size=elements)
        tensor.string_val.append(value)
    nodes.add(name="save/RestoreV2", op="RestoreV2").input.extend(
        ["save/Const", "save/names", "save/slices"]
    )
    for i in range(assigns):
        nodes.add(name=f"v{i}", op="VariableV2")
        nodes.add(name=f"save/Assign_{i}", op="Assign").input.extend(
            [f"v{i}", f"save/RestoreV2:{i}"]
        )
    meta.saver_def.restore_op_name = "save/restore_all"
    return meta.SerializeToString()


@case(
    "meta-const-bomb",
    action="inspect",
    summary="3 KB .meta, string Const of shape [2^24] read by 100 Assign nodes",
)
def meta_const_bomb(directory: Path) -> Path:
    prefix = directory / "model"
    anyckpt.sync.save(str(prefix), {"w": np.arange(4, dtype=np.float32)})
    prefix.with_suffix(".meta").write_bytes(meta_const_bomb_bytes())
    return prefix


@case("meta-const-bomb-read-meta-graph", action="meta", summary="the same, anyckpt.read_meta_graph")
def meta_const_bomb_meta(directory: Path) -> Path:
    path = directory / "model.meta"
    path.write_bytes(meta_const_bomb_bytes())
    return path


def meta_identity_chain_bytes(chain: int = 100, assigns: int = 20_000) -> bytes:
    """A MetaGraphDef whose ``assigns`` Assign nodes all restore through one chain of
    ``chain`` Identity nodes (each Assign once walked the whole chain: 29 s for 2.6 MB)."""
    from anyckpt._proto.meta_graph_pb2 import MetaGraphDef

    meta = MetaGraphDef()
    nodes = meta.graph_def.node
    const = nodes.add(name="save/names", op="Const")
    const.attr["value"].tensor.dtype = 7  # DT_STRING
    const.attr["value"].tensor.string_val.append(b"w")
    nodes.add(name="save/RestoreV2", op="RestoreV2").input.extend(["p", "save/names", "s"])
    previous = "save/RestoreV2"
    for i in range(chain):
        nodes.add(name=f"save/id{i}", op="Identity").input.append(previous)
        previous = f"save/id{i}"
    nodes.add(name="v", op="VariableV2")
    for i in range(assigns):
        nodes.add(name=f"save/a{i}", op="Assign").input.extend(["v", previous])
    meta.saver_def.restore_op_name = "save/restore_all"
    return meta.SerializeToString()


@case(
    "meta-identity-chain",
    action="meta",
    summary="500 KB .meta, 20,000 Assigns behind one chain of 100 Identity nodes",
)
def meta_identity_chain(directory: Path) -> Path:
    path = directory / "model.meta"
    path.write_bytes(meta_identity_chain_bytes())
    return path


def meta_empty_nodes_bytes(nodes: int = 200_000) -> bytes:
    """A MetaGraphDef of ``nodes`` empty NodeDefs, 2 bytes each on the wire: protobuf's
    in-memory messages (upb) take ~56 times that (the known limit of the .meta row)."""
    body = b"\x0a\x00" * nodes  # GraphDef.node (field 1), empty
    size = len(body)
    varint = bytearray()
    while True:
        varint.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return b"\x12" + bytes(varint) + body  # MetaGraphDef.graph_def (field 2)


@case(
    "meta-empty-nodes",
    action="meta",
    summary="400 KB .meta of 200,000 empty NodeDefs (protobuf's in-memory size)",
)
def meta_empty_nodes(directory: Path) -> Path:
    path = directory / "model.meta"
    path.write_bytes(meta_empty_nodes_bytes())
    return path


def meta_text_empty_nodes_bytes(nodes: int = 200_000) -> bytes:
    """The text-format twin of :func:`meta_empty_nodes_bytes` (``export(as_text=True)``)."""
    return b"graph_def {\n" + b"node {}\n" * nodes + b"}\n"


@case(
    "meta-text-empty-nodes",
    action="meta",
    summary="1.6 MB text-format .meta of 200,000 empty NodeDefs",
)
def meta_text_empty_nodes(directory: Path) -> Path:
    path = directory / "model.meta"
    path.write_bytes(meta_text_empty_nodes_bytes())
    return path


#: A text-format ``.meta`` is parsed whole by protobuf: its RSS may reach this many times the
#: input (upb's in-memory messages: ~38x measured for empty NodeDefs, 8 text bytes each). A
#: binary ``.meta`` is read one node at a time and held to the ordinary bound.
PROTOBUF_RSS_FACTOR = 64
PROTOBUF_ACTIONS = frozenset({"meta", "inspect", "fuzz_meta"})


def read_as_text_meta(path: Path) -> bool:
    """Whether anyckpt reads a ``.meta`` at ``path`` (the file, or one beside the case's
    path) with the text-format parser: the bytes are not a binary MetaGraphDef."""

    candidates = [path] if path.suffix != ".meta" and path.is_file() else []
    candidates += [p for p in path.parent.iterdir() if p.suffix == ".meta" and p.is_file()]
    return any(not _reads_as_binary(candidate.read_bytes()) for candidate in candidates)


def _reads_as_binary(data: bytes) -> bool:
    from anyckpt.meta import _BinaryGraph

    try:
        _BinaryGraph(data).info()
    except Exception:  # whatever the binary reading refuses goes to the text parser
        return False
    return True


# -- defect 5: zstd frames at zstd's own limit (~32,700 raw bytes per stored byte) ----------


def zstd_zeros_bomb_bytes(raw_bytes: int = 256 << 20, chunk_bytes: int = 4 << 20) -> bytes:
    """A ``.zckpt`` declaring one float32 tensor of ``raw_bytes`` zeros, in real zstd frames of
    ``chunk_bytes`` zeros each (RLE blocks: ~8 KB on disk for 256 MiB)."""
    import zstandard
    from anyckpt_zstd import codec

    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(chunk_bytes))
    crc = anyckpt.codecs.crc.crc32c(bytes(chunk_bytes))
    count = raw_bytes // chunk_bytes
    chunks = [codec.Chunk(i * len(frame), len(frame), chunk_bytes, crc) for i in range(count)]
    info = codec.TensorInfo(1, (raw_bytes // 4,), "raw", tuple(chunks))
    header = codec.encode_header(3, {"zeros": info})
    frames = frame * count
    return frames + header + codec.encode_footer(len(frames), header)


@case("zstd-ratio-bomb", summary="8 KB .zckpt whose frames decompress to 256 MiB")
def zstd_ratio_bomb(directory: Path) -> Path:
    (directory / "model.zckpt").write_bytes(zstd_zeros_bomb_bytes())
    return directory / "model"


@case("zstd-ratio-bomb-one-chunk", summary="8 KB .zckpt, one 256 MiB chunk")
def zstd_ratio_bomb_one_chunk(directory: Path) -> Path:
    data = zstd_zeros_bomb_bytes(256 << 20, 256 << 20)
    (directory / "model.zckpt").write_bytes(data)
    return directory / "model"


# -- running an action -----------------------------------------------------------------------


def run_action(action: str, path: str) -> int:
    """Run ``action`` on ``path``; return the bytes of tensors it returned. Raises what the
    action raises (a CheckpointError for a refused file)."""
    if action == "read":
        return anyio.run(read_everything, path, None, None)
    if action == "meta":
        anyckpt.sync.read_meta_graph(path)
        return 0
    if action == "inspect":
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = anyckpt.cli.main(["inspect", "--json", "--no-progress", path])
        if code:
            raise CheckpointError(f"anyckpt inspect exited {code}: {err.getvalue().strip()}")
        return 0
    raise ValueError(f"unknown action {action!r}")


def files_bytes(path: Path) -> int:
    """Bytes of the files a case wrote (everything in its directory)."""
    directory = path.parent
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


# -- the probe -------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    """Give freed heap back to the system and reset VmHWM (Linux >= 4.0); False if not
    possible (then the RSS figure is not reported)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _measured(fn: Callable[[], int], expected: tuple[type[BaseException], ...]) -> dict[str, Any]:
    error: str | None = None
    asked = 0
    rss = _reset_rss_peak()
    before = _status("VmRSS")
    tracemalloc.start()
    try:
        asked = fn()
    except expected as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {
        "error": error,
        "asked": asked,
        "traced_peak": traced,
        "rss_peak": _status("VmHWM") - before if rss else None,
    }


def measure(action: str, path: str) -> dict[str, Any]:
    """Run ``action`` on ``path`` under tracemalloc and the RSS high-water mark:
    ``{"error": None | "CorruptCheckpointError: ...", "asked": bytes returned,
    "traced_peak": tracemalloc peak, "rss_peak": VmHWM - VmRSS before, or None}``."""
    return _measured(lambda: run_action(action, path), (CheckpointError, DecodeError))


def timed(action: str, path: str) -> dict[str, Any]:
    """Run ``action`` on ``path`` once, without tracemalloc (whose overhead would distort the
    time): wall seconds, and the process's peak RSS before and after (imports included)."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    error = None
    try:
        run_action(action, path)
    except (CheckpointError, DecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mb": round(before / (1 << 20), 1),
        "error": error,
    }


def warm_up(directory: Path) -> None:
    """Import what the actions import lazily (formats, plugins, CLI), on a small valid
    checkpoint, so that a measurement sees only the case's own allocations."""
    prefix = directory / "warm"
    anyckpt.sync.save(str(prefix), {"w": np.arange(6.0).reshape(2, 3)}, write_meta_graph=True)
    for action in ("read", "inspect", "meta"):
        run_action(action, str(prefix))
    with contextlib.suppress(CheckpointError, ImportError):
        anyckpt.sync.save(str(directory / "z"), {"w": np.zeros(4)}, format="zstd")
        run_action("read", str(directory / "z"))


def measure_corpus(harness: str, paths: list[str]) -> list[dict[str, Any]]:
    """:func:`measure` for inputs of a fuzz harness's corpus, through its target in
    ``fuzz/targets.py`` (with the harness's checksum setting); each input runs once unmeasured
    first, so that lazy imports and caches are not counted."""
    import targets

    if harness not in targets.WITH_CHECKSUMS:
        targets.bypass_checksums()
    target = targets.TARGETS[harness]
    inputs = [Path(p).read_bytes() for p in paths]
    for data in inputs:
        targets.run_one(target, data)
    out = []
    for path, data in zip(paths, inputs, strict=True):
        result = _measured(lambda data=data: target(data), targets.EXPECTED)
        out.append({"path": path, "size": len(data), **result})
    return out


def main(argv: list[str]) -> int:
    import tempfile

    if len(argv) == 3 and argv[0] == "measure":
        with tempfile.TemporaryDirectory() as tmp:
            warm_up(Path(tmp))
        print(json.dumps(measure(argv[1], argv[2])))
        return 0
    if len(argv) == 2 and argv[0] == "build":
        for c in CASES:
            directory = Path(argv[1]) / c.name
            directory.mkdir(parents=True, exist_ok=True)
            path = c.build(directory)
            print(f"{c.name}\t{c.action}\t{path}\t{files_bytes(path)} bytes")
        return 0
    if len(argv) == 3 and argv[0] == "run":
        print(json.dumps(timed(argv[1], argv[2])))
        return 0
    if len(argv) >= 2 and argv[0] == "corpus":
        for result in measure_corpus(argv[1], argv[2:]):
            print(json.dumps(result))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
