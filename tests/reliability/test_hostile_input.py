"""Hostile and damaged input (issue 7, part 4), fuzzed with hypothesis.

Whole checkpoints of every registered format (V2, V1, and the plugins' safetensors and zstd)
are damaged at random (bytes flipped, overwritten, inserted, deleted; files truncated, extended
or replaced) and read through the public API (open, keys, specs, read_many, partial reads).
Every input must give the library's own error (a CheckpointError), quickly, without allocating
far beyond the size of the files, and without a read outside a file (every ``preadv`` anyckpt
issues on local disk is checked against the file's size); or, if it still reads, exactly the
values saved (safetensors, which has no checksums, at least the saved names, dtypes and
shapes).

The parsers underneath are fuzzed directly on arbitrary bytes too (V1 metadata, slices, blocks
and footers; the bundle header; the plugins' headers and footers): each raises only its own
error type. (tests/test_codecs.py and tests/test_state_file.py do the same for the table, bundle
entries, OrderedCode, varints and the state file.)

State files naming paths outside the directory (``../``, absolute paths elsewhere, other URLs,
drive letters, NUL) are refused by the manager and by every CLI command that reads a directory
(``ls``, ``inspect``, ``verify``, ``prune``): nothing outside is opened, and nothing is deleted.

The coverage-guided counterpart (atheris) lives in ``fuzz/``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from os_seam import os_replaced
from reliability_common import record_figures, scaled

import anyckpt
import anyckpt.cli
import anyckpt.storage
from anyckpt import CheckpointError, CheckpointManager, CheckpointState, UnsafePathError
from anyckpt.codecs import DecodeError
from anyckpt.codecs.state_file import encode_state

#: Budget per damaged checkpoint: time (s), and memory beyond the files' size.
MAX_SECONDS = 5.0
MAX_EXTRA_BYTES = 16 << 20
EXAMPLES = scaled(40, 1500)

_COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    _COUNTS[name] = _COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if _COUNTS:
        record_figures("hypothesis", dict(sorted(_COUNTS.items())))


# -- seeds: one small checkpoint per format -------------------------------------------------


def _tensors(strings: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "a/kernel": np.arange(24, dtype=np.float32).reshape(4, 6),
        "a/bias": np.arange(6, dtype=np.int64),
        "b/scalar": np.array(3.5, dtype=np.float64),
        "b/flags": np.array([True, False, True]),
        "c/half": np.linspace(0, 1, 10, dtype=np.float16),
    }
    if strings:
        out["c/names"] = np.array([b"alpha", b"", b"\x00\xff" * 3], dtype=object)
    return out


_SEEDS: dict[str, tuple[Path, dict[str, bytes], dict[str, Any]]] = {}
_SEED_DIR = Path(tempfile.mkdtemp(prefix="anyckpt-hostile-seeds-"))


def _seed(fmt: str) -> tuple[str, dict[str, bytes]]:
    """The base name and file contents of a small checkpoint in format ``fmt``."""
    if fmt not in _SEEDS:
        directory = _SEED_DIR / fmt
        directory.mkdir()
        prefix = directory / "model"
        options = {"num_shards": 2} if fmt == "v2" else None
        tensors = _tensors(True)
        try:
            paths = anyckpt.sync.save(str(prefix), tensors, format=fmt, options=options)
        except CheckpointError:
            tensors = _tensors(False)
            paths = anyckpt.sync.save(str(prefix), tensors, format=fmt)
        _SEEDS[fmt] = (prefix, {Path(p).name: Path(p).read_bytes() for p in paths}, tensors)
    prefix, files, _ = _SEEDS[fmt]
    return prefix.name, files


def _saved(fmt: str) -> dict[str, Any]:
    """The tensors the seed of ``fmt`` holds."""
    _seed(fmt)
    return _SEEDS[fmt][2]


#: Formats whose files carry checksums of every tensor's bytes (V2: a CRC32C per tensor; V1:
#: a CRC32C per table block; zstd: per frame). A damaged one that reads must read the exact
#: saved values. safetensors has no checksum at all (the format's own choice): damaged tensor
#: bytes read as other values, and only its header (names, dtypes, shapes) is checked.
UNCHECKSUMMED = {"safetensors"}


def _same(got: Any, want: Any) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype == object:
        return [bytes(v) for v in got.ravel()] == [bytes(v) for v in want.ravel()]
    return bool(np.array_equal(got, want))


FORMATS = anyckpt.available_formats()


# -- damage ----------------------------------------------------------------------------------


@st.composite
def _damage(draw: st.DrawFn, files: dict[str, bytes]) -> dict[str, bytes]:
    """The files with one of them damaged by 1-4 edits (or replaced, or removed)."""
    out = dict(files)
    name = draw(st.sampled_from(sorted(files)))
    data = bytearray(files[name])
    kind = draw(st.sampled_from(["edits", "edits", "edits", "replace", "empty"]))
    if kind == "replace":
        data = bytearray(draw(st.binary(max_size=256)))
    elif kind == "empty":
        data = bytearray()
    else:
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            if op == "flip" and data:
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "set":
                chunk = draw(st.binary(min_size=1, max_size=8))
                data[at : at + len(chunk)] = chunk
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete":
                del data[at : at + draw(st.integers(1, 16))]
            elif op == "truncate":
                del data[at:]
            elif op == "append":
                data += draw(st.binary(min_size=1, max_size=64))
    out[name] = bytes(data)
    return out


class _BoundsCheckingOs:
    """``os`` for anyckpt's local I/O (tests/os_seam.py): every preadv must lie inside its file."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.sizes: dict[int, int] = {}
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        fd = int(self._real.open(path, flags, mode, **kwargs))
        self.sizes[fd] = self._real.fstat(fd).st_size
        return fd

    def close(self, fd: int) -> None:
        self.sizes.pop(fd, None)
        self._real.close(fd)

    def preadv(self, fd: int, buffers: Any, offset: int) -> int:
        length = sum(memoryview(b).nbytes for b in buffers)
        size = self.sizes.get(fd)
        assert size is not None
        assert offset >= 0, offset
        assert offset + length <= size, (offset, length, size)
        self.reads += 1
        return int(self._real.preadv(fd, buffers, offset))


@contextlib.contextmanager
def _guarded() -> Iterator[_BoundsCheckingOs]:
    with os_replaced(_BoundsCheckingOs(os)) as checker:
        yield checker


async def _read_everything(prefix: str) -> dict[str, Any]:
    """Every tensor, whole, and the first three also partly (under ``KEY[1:]``)."""
    async with anyckpt.open(prefix) as reader:
        keys = reader.keys()
        for key in keys:
            spec = reader.spec(key)
            assert spec.size >= 0
        out: dict[str, Any] = dict(await reader.read_many())
        for key in keys[:3]:
            spec = reader.spec(key)
            if len(spec.shape) >= 1 and spec.shape[0] > 1:
                out[f"{key}[1:]"] = await reader.read(key, index=(slice(1, spec.shape[0]),))
        return out


def _check_values(fmt: str, got: dict[str, Any]) -> str:
    """An undamaged-looking read: "ok" if it gave exactly the saved tensors; "unchecked"
    (safetensors only) if the names, dtypes and shapes are right but values differ."""
    saved = _saved(fmt)
    parts = {f"{k}[1:]": np.asarray(v)[1:] for k, v in saved.items() if np.ndim(v) >= 1}
    want = {**saved, **parts}
    want = {k: v for k, v in want.items() if k in saved or k in got}
    assert set(got) == set(want), (sorted(got), sorted(want))
    wrong = [k for k in want if not _same(got[k], want[k])]
    if not wrong:
        return "ok"
    assert fmt in UNCHECKSUMMED, f"{fmt}: damaged checkpoint read as other values: {wrong}"
    for key in wrong:
        g, w = np.asarray(got[key]), np.asarray(want[key])
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (key, g.dtype, g.shape, w.dtype, w.shape)
    return "unchecked"


def _read_damaged(fmt: str, directory: Path, base: str, files: dict[str, bytes]) -> str:
    """Write ``files`` into ``directory`` and read the checkpoint back under the guards;
    return the name of the CheckpointError it raised, or "ok" if it read exactly the saved
    values ("unchecked": see :func:`_check_values`)."""
    for old in directory.iterdir():
        old.unlink()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    size = sum(len(d) for d in files.values())
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    got: dict[str, Any] | None = None
    try:
        with _guarded():
            got = anyio.run(_read_everything, str(directory / base))
        outcome = "read"
    except CheckpointError as exc:
        outcome = type(exc).__name__
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < MAX_SECONDS, elapsed
    assert peak < 4 * size + MAX_EXTRA_BYTES, (peak, size)
    return outcome if got is None else _check_values(fmt, got)


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_checkpoints_give_checkpoint_errors(fmt: str, tmp_path_factory: Any) -> None:
    base, files = _seed(fmt)
    directory = tmp_path_factory.mktemp(f"damaged-{fmt}")
    assert _read_damaged(fmt, directory, base, files) == "ok"  # the seed itself reads
    outcomes: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_damage(files))
    def run(damaged: dict[str, bytes]) -> None:
        outcome = _read_damaged(fmt, directory, base, damaged)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        _count(f"damaged {fmt}")

    run()
    assert sum(v for k, v in outcomes.items() if k not in ("ok", "unchecked")) > 0, outcomes


# -- the parsers on arbitrary bytes ---------------------------------------------------------


def _parsers() -> dict[str, tuple[Callable[[bytes], object], tuple[type[BaseException], ...]]]:
    from anyckpt.codecs import bundle, v1

    out: dict[str, tuple[Callable[[bytes], object], tuple[type[BaseException], ...]]] = {
        "v1.decode_meta": (v1.decode_meta, (DecodeError,)),
        "v1.decode_slice_entry": (lambda b: v1.decode_slice_entry(memoryview(b)), (DecodeError,)),
        "v1.decode_slice_proto": (v1.decode_slice_proto, (DecodeError,)),
        "v1.decode_footer": (v1.decode_footer, (DecodeError,)),
        "v1.block_entries": (lambda b: v1.block_entries(memoryview(b)), (DecodeError,)),
        "v1.check_block": (lambda b: v1.check_block(b, 0), (DecodeError,)),
        "v1.decode_tensor_proto(float)": (
            lambda b: v1.decode_tensor_proto(memoryview(b), 1, 4),
            (DecodeError,),
        ),
        "v1.decode_tensor_proto(string)": (
            lambda b: v1.decode_tensor_proto(memoryview(b), 7, 3),
            (DecodeError,),
        ),
        "bundle.decode_header": (bundle.decode_header, (DecodeError,)),
        "bundle.decode_string_tensor": (
            lambda b: bundle.decode_string_tensor(b, 3, expected_crc=None),
            (DecodeError,),
        ),
    }
    with contextlib.suppress(ImportError):
        from anyckpt_safetensors import codec as st_codec

        out["safetensors.header_length"] = (
            lambda b: st_codec.header_length(b[:8], len(b)),
            (st_codec.HeaderError,),
        )
        out["safetensors.decode_header"] = (
            lambda b: st_codec.decode_header(b, 1 << 20),
            (st_codec.HeaderError,),
        )
    with contextlib.suppress(ImportError):
        from anyckpt_zstd import codec as z_codec

        out["zstd.decode_footer"] = (
            lambda b: z_codec.decode_footer(b, 1 << 20),
            (z_codec.ContainerError,),
        )
        out["zstd.decode_header"] = (
            lambda b: z_codec.decode_header(b, 0, 1 << 20),
            (z_codec.ContainerError,),
        )
        out["zstd.decode_strings"] = (
            lambda b: z_codec.decode_strings(b, 3),
            (z_codec.ContainerError,),
        )
    return out


PARSERS = _parsers()


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parsers_on_arbitrary_bytes_raise_only_their_own_error(name: str) -> None:
    parse, allowed = PARSERS[name]

    @settings(max_examples=scaled(150, 5000), deadline=None)
    @given(st.binary(max_size=512))
    def run(data: bytes) -> None:
        with contextlib.suppress(*allowed):
            parse(data)
        _count("parser inputs")

    run()


# -- state files naming paths outside the directory -----------------------------------------

HOSTILE_PATHS = st.one_of(
    st.sampled_from(
        [
            "../ckpt-1",
            "../../etc/passwd",
            "/etc/passwd",
            "{outside}/ckpt-1",
            "{outside}/../ckpts/ckpt-1",
            "s3://bucket/ckpt-1",
            "file:///etc/passwd",
            "memory://x/ckpt-1",
            "C:\\ckpt-1",
            "sub/ckpt-1",
            "..",
            ".",
            "ckpt-1\x00",
            "ckpt-1\\..\\..\\x",
            "{directory}/../outside/ckpt-1",
            "{directory}//ckpt-1/..",
        ]
    ),
    st.builds(
        lambda prefix, name: prefix + name,
        st.sampled_from(["../", "/", "//", "~/", "./../", "\\\\server\\share\\", "gs://b/"]),
        st.from_regex(r"[a-z0-9._-]{1,12}", fullmatch=True),
    ),
)


class _Recorder:
    """``os`` for anyckpt's local I/O (tests/os_seam.py), recording every path it is asked
    to touch."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.paths: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in {"open", "unlink", "remove", "listdir", "replace", "rename", "link", "stat"}:

            def record(*args: Any, **kwargs: Any) -> Any:
                self.paths.extend(str(a) for a in args if isinstance(a, (str, Path)))
                return attr(*args, **kwargs)

            return record
        return attr


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


_CLI = [
    ["ls", "{directory}"],
    ["ls", "--json", "{directory}"],
    ["inspect", "{directory}"],
    ["verify", "{directory}"],
    ["prune", "--max-to-keep", "1", "{directory}"],
]


def test_state_files_naming_outside_paths_are_refused_by_manager_and_cli() -> None:
    root = Path(tempfile.mkdtemp(prefix="anyckpt-hostile-state-"))
    try:
        directory, outside = root / "run" / "ckpts", root / "run" / "outside"
        for d, step in ((directory, 1), (directory, 2), (outside, 1)):
            anyckpt.sync.save(str(d / f"ckpt-{step}"), {"x": np.arange(step + 1)})
        (outside / "sentinel.txt").write_text("do not touch")
        (directory / "ckpt-9.data-00000-of-00001").write_bytes(b"orphan debris")
        seen: dict[str, int] = {}

        @settings(max_examples=scaled(25, 400), deadline=None)
        @given(HOSTILE_PATHS, st.sampled_from(["tracked", "latest", "both"]))
        def run(raw: str, where: str) -> None:
            path = raw.format(outside=outside, directory=directory)
            tracked = (path, "ckpt-2") if where != "latest" else ("ckpt-1", "ckpt-2")
            latest = path if where != "tracked" else "ckpt-2"
            state = CheckpointState(latest, tracked, (100.0, 200.0), 50.0)
            try:
                data = encode_state(state)
            except ValueError:
                return  # not even encodable (lone surrogates): nobody can write it
            (directory / "checkpoint").write_bytes(data)
            before = _snapshot(root)
            recorder = _Recorder(os)
            with os_replaced(recorder):
                with pytest.raises(UnsafePathError):
                    anyio.run(_open_and_save, str(directory))
                for argv in _CLI:
                    args = [a.format(directory=directory) for a in argv]
                    with (
                        contextlib.redirect_stdout(io.StringIO()) as out,
                        contextlib.redirect_stderr(io.StringIO()) as err,
                    ):
                        code = anyckpt.cli.main(args)
                    text = out.getvalue() + err.getvalue()
                    if argv[0] == "prune":
                        assert code != 0, text  # refused
                    assert "internal error" not in text, text
                    seen[argv[0]] = seen.get(argv[0], 0) + 1
            assert _snapshot(root) == before  # nothing deleted or changed anywhere
            for touched in recorder.paths:
                resolved = os.path.realpath(touched)
                assert resolved.startswith(str(directory.resolve())) or resolved == str(
                    directory.parent.resolve()
                ), (raw, touched)
            _count("hostile state files")

        run()
        assert seen.get("prune")
    finally:
        shutil.rmtree(root)


async def _open_and_save(directory: str) -> None:
    async with CheckpointManager(directory, max_to_keep=1) as manager:
        await (await manager.save({"x": np.zeros(1)}))
