"""The ``anyckpt`` command as a user runs it: the installed console script (and ``python -m
anyckpt``) in a subprocess, piped and on a pseudo-terminal, checking output and exit codes.

TensorFlow-written fixtures (``tests/fixtures/tf-2.21``) are used in place, read-only; tests
that damage one work on a copy.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixture_paths import TF_FIXTURES as FIXTURES

import anyckpt
from anyckpt.storage import TEMP_MARKER

BIN = Path(sys.executable).parent
ANYCKPT = str(BIN / "anyckpt")
ANSI = re.compile(r"\x1b\[")
TIMEOUT = 120


def run(
    *args: str, cwd: Path | None = None, module: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the console script (or ``python -m anyckpt``) with stdout and stderr piped."""
    command = [sys.executable, "-m", "anyckpt"] if module else [ANYCKPT]
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


def run_pty(*args: str, cwd: Path | None = None, columns: int | None = None) -> tuple[int, str]:
    """Run the console script on a pseudo-terminal (stdout and stderr both a tty), 120 columns
    by ``COLUMNS``, or ``columns`` wide by the terminal's own size (TIOCSWINSZ, no COLUMNS);
    return its status and everything it wrote."""
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm"
    if columns is None:
        env["COLUMNS"] = "120"
    else:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [ANYCKPT, *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("anyckpt: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory a manager wrote (steps 1-5, max_to_keep=3), plus what an interrupted save
    leaves: a data file without its index and a temporary file."""
    root = tmp_path_factory.mktemp("run") / "ckpts"
    rng = np.random.default_rng(0)
    with anyckpt.sync.CheckpointManager(root, max_to_keep=3) as manager:
        for step in range(1, 6):
            manager.save(
                {"w": rng.standard_normal((64, 32)).astype(np.float32), "step": step}, step=step
            )
        manager.wait()
    (root / "ckpt-6.data-00000-of-00001").write_bytes(b"\0" * 100)
    (root / f"ckpt-6.index{TEMP_MARKER}1234abcd").write_bytes(b"\0" * 10)
    (root / "notes.txt").write_text("not a checkpoint")
    return root


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, str]:
    """A copy of v2_partitioned with one bit of ``plain/b`` flipped in the data file."""
    copy = tmp_path / "v2_partitioned"
    shutil.copytree(FIXTURES / "v2_partitioned", copy)
    for path in copy.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    expected = anyckpt.sync.load(FIXTURES / "v2_partitioned" / "model.ckpt-1", ["plain/b"])
    data_file = copy / "model.ckpt-1.data-00000-of-00001"
    data = bytearray(data_file.read_bytes())
    needle = expected["plain/b"].tobytes()
    assert data.count(needle) == 1
    data[data.index(needle)] ^= 0x01
    data_file.write_bytes(bytes(data))
    return copy, str(data_file)


# -- the basics --------------------------------------------------------------------------------


def test_help_lists_every_command_and_exit_codes() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "ls", "inspect", "verify", "convert", "diff", "prune"):
        assert command in result.stdout
    assert "Exit status" in result.stdout


def test_python_dash_m_and_version() -> None:
    result = run("--version", module=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"anyckpt {anyckpt.__version__}"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["ls"],
        ["frobnicate"],
        ["inspect", "x", "--bogus"],
        ["ls", "x", "--storage-option", "novalue"],
        ["prune", "x", "--max-to-keep", "0"],
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    one_error_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "/nonexistent/anyckpt-dir"],
        ["inspect", "/nonexistent/ckpt-1"],
        ["verify", "/nonexistent/anyckpt-dir"],
        ["diff", "/nonexistent/a", "/nonexistent/b"],
        ["convert", "/nonexistent/a", "/tmp/anyckpt-never-written"],
        ["prune", "/nonexistent/anyckpt-dir", "--dry-run"],
    ],
)
def test_missing_paths_exit_3_with_one_line(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 3, result.stderr
    line = one_error_line(result)
    assert "/nonexistent/" in line
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_debug_shows_the_traceback() -> None:
    result = run("ls", "/nonexistent/anyckpt-dir", "--debug")
    assert result.returncode == 3
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("anyckpt: error: ")


def test_common_options_go_before_or_after_the_command(run_dir: Path) -> None:
    before = run("--json", "ls", str(run_dir))
    after = run("ls", str(run_dir), "--json")
    assert before.returncode == after.returncode == 0
    assert json.loads(before.stdout)["latest"] == json.loads(after.stdout)["latest"] == "ckpt-5"


# -- ls ------------------------------------------------------------------------------------------


def test_ls_reads_a_tensorflow_checkpoint_manager_directory() -> None:
    result = run("ls", str(FIXTURES / "tf2_object"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    row = {
        name: next(line for line in lines if f" {name} " in line) for name in ("ckpt-2", "ckpt-4")
    }
    assert "tracked" in row["ckpt-2"]
    assert "latest" not in row["ckpt-2"]
    assert "tracked, latest" in row["ckpt-4"]
    assert not ANSI.search(result.stdout + result.stderr)

    doc = json.loads(run("ls", str(FIXTURES / "tf2_object"), "--json").stdout)
    assert [c["step"] for c in doc["checkpoints"]] == [2, 3, 4]
    assert {c["status"] for c in doc["checkpoints"]} == {"tracked"}
    assert [c["latest"] for c in doc["checkpoints"]] == [False, False, True]
    assert {c["time_source"] for c in doc["checkpoints"]} == {"state file"}
    stamps = doc["state_file"]["all_model_checkpoint_timestamps"]
    assert [c["time"] for c in doc["checkpoints"]] == stamps
    assert all(len(c["files"]) == 2 and c["format"] == "v2" for c in doc["checkpoints"])
    assert doc["orphans"] == []


def test_ls_of_a_saver_directory_shows_untracked_checkpoints_as_preserved() -> None:
    doc = json.loads(run("ls", str(FIXTURES / "v2_max_to_keep"), "--json").stdout)
    assert [c["name"] for c in doc["checkpoints"]] == ["model.ckpt-3", "model.ckpt-4"]
    # No timestamps in a Saver's state file: a manager adopts none of them (TF's rule).
    assert {c["status"] for c in doc["checkpoints"]} == {"preserved"}
    assert all(c["in_state_file"] for c in doc["checkpoints"])
    assert {"model.ckpt-3.meta", "model.ckpt-4.meta"} <= {f["name"] for f in doc["other_files"]}


def test_ls_shows_what_an_interrupted_save_left(run_dir: Path) -> None:
    result = run("ls", str(run_dir))
    assert result.returncode == 0
    assert "ckpt-6.data-00000-of-00001" in result.stdout
    assert "data file without its index" in result.stdout
    assert "temporary file of an interrupted write" in result.stdout
    doc = json.loads(run("ls", str(run_dir), "--json").stdout)
    assert [c["name"] for c in doc["checkpoints"]] == ["ckpt-3", "ckpt-4", "ckpt-5"]
    assert {o["name"] for o in doc["orphans"]} == {
        "ckpt-6.data-00000-of-00001",
        f"ckpt-6.index{TEMP_MARKER}1234abcd",
    }
    assert [f["name"] for f in doc["other_files"]] == ["notes.txt"]


def test_ls_accepts_fsspec_urls(run_dir: Path) -> None:
    doc = json.loads(run("ls", f"file://{run_dir}", "--json").stdout)
    assert doc["latest"] == "ckpt-5"


def test_ls_of_a_file_says_so(run_dir: Path) -> None:
    result = run("ls", str(run_dir / "notes.txt"))
    assert result.returncode == 3
    assert "not a directory" in one_error_line(result)


# -- inspect -------------------------------------------------------------------------------------


def test_inspect_shows_partitions() -> None:
    result = run("inspect", str(FIXTURES / "v2_partitioned" / "model.ckpt-1"))
    assert result.returncode == 0, result.stderr
    assert "format v2" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "part/w " in line)
    assert "float32" in row
    assert "[10, 4]" in row
    assert "3: [0:4, :] [4:7, :] [7:10, :]" in row
    assert "[:, 0:3] [:, 3:5] [:, 5:7]" in result.stdout  # part/cols, split along axis 1

    doc = json.loads(run("inspect", str(FIXTURES / "v2_partitioned"), "--json").stdout)
    specs = {t["key"]: t for t in doc["tensors"]}
    assert len(specs["part/w"]["partitions"]) == 3
    assert specs["plain/b"]["partitions"] == []
    assert specs["part/str"]["dtype"] == "string"
    assert len(doc["files"]) == 2


def test_inspect_values_of_one_key() -> None:
    prefix = str(FIXTURES / "v2_partitioned" / "model.ckpt-1")
    result = run("inspect", prefix, "--values", "--key", "part/w")
    assert result.returncode == 0, result.stderr
    assert "part/w = [[0.  , 0.25, 0.5 , 0.75]," in result.stdout
    assert "plain/b" not in result.stdout
    doc = json.loads(run("inspect", prefix, "--values", "-k", "part/str", "--json").stdout)
    [tensor] = doc["tensors"]
    assert tensor["values"][0] == "s0"
    assert tensor["values"][3] == {"base64": "gA=="}  # b"\x80" is not UTF-8


def test_inspect_shows_the_meta_graph() -> None:
    result = run("inspect", str(FIXTURES / "v1_sharded" / "model.ckpt-5-?????-of-00002"))
    assert result.returncode == 0, result.stderr
    assert "meta graph: " in result.stdout
    assert "saver: version V1, max_to_keep 5" in result.stdout
    assert "sharded True" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "part_1" in line)
    assert "d1/part" in row
    assert "5 3 0,5:2,1" in row
    doc = json.loads(run("inspect", str(FIXTURES / "v2_dtypes"), "--json").stdout)
    assert doc["meta_graph"]["saver_def"]["version"] == "V2"
    assert len(doc["meta_graph"]["variables"]) == len(doc["tensors"])
    plain = json.loads(run("inspect", str(FIXTURES / "tf2_object"), "--json").stdout)
    assert plain["meta_graph"] is None  # tf.train.CheckpointManager writes no .meta


def test_inspect_of_a_damaged_meta_graph_exits_1(tmp_path: Path) -> None:
    prefix = tmp_path / "m-1"
    assert (
        run("convert", str(FIXTURES / "v2_large_entry" / "model.ckpt-1"), str(prefix)).returncode
        == 0
    )
    (tmp_path / "m-1.meta").write_bytes(b"\xff" * 64)
    result = run("inspect", str(prefix))
    assert result.returncode == 1
    assert "m-1.meta" in one_error_line(result)


def test_inspect_unknown_key_exits_3() -> None:
    result = run("inspect", str(FIXTURES / "v2_partitioned"), "--key", "nope")
    assert result.returncode == 3
    assert "'nope'" in one_error_line(result)


# -- verify --------------------------------------------------------------------------------------


def test_verify_tensorflow_checkpoints() -> None:
    result = run("verify", str(FIXTURES / "tf2_object"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 3
    assert "3 of 3 checkpoints ok" in result.stdout
    assert result.stderr == ""


def test_verify_names_the_file_and_tensor_of_a_flipped_byte(damaged: tuple[Path, str]) -> None:
    directory, data_file = damaged
    for target in (directory, directory / "model.ckpt-1"):
        result = run("verify", str(target))
        assert result.returncode == 1
        assert "DAMAGED" in result.stdout
        line = one_error_line(result)
        assert data_file in line
        assert "'plain/b'" in line
        assert "checksum mismatch" in line
    doc = json.loads(run("verify", str(directory), "--json").stdout)
    assert doc["ok"] is False
    [problem] = doc["checkpoints"][0]["problems"]
    assert problem["file"] == data_file
    assert problem["tensor"] == "plain/b"


def test_verify_reports_a_missing_data_file(tmp_path: Path) -> None:
    anyckpt.sync.save(tmp_path / "m-1", {"a": np.arange(10), "b": np.ones(3)})
    (tmp_path / "m-1.data-00000-of-00001").unlink()
    result = run("verify", str(tmp_path / "m-1"))
    assert result.returncode == 1
    assert "file is missing (2 tensors unreadable)" in one_error_line(result)


def test_verify_reports_an_entry_whose_size_disagrees_with_its_shape(tmp_path: Path) -> None:
    """An index whose checksums are fine but whose entry for ``b`` claims 8 bytes for three
    float64s: verify lists it as DAMAGED (exit 1, the index named), and goes on to the
    other checkpoints of the directory."""
    from dataclasses import replace

    from anyckpt.codecs.bundle import decode_entry, encode_entry
    from anyckpt.codecs.table import build_table, read_table

    anyckpt.sync.save(tmp_path / "m-1", {"a": np.arange(10), "b": np.ones(3)})
    anyckpt.sync.save(tmp_path / "m-2", {"a": np.arange(10)})
    index = tmp_path / "m-1.index"
    entries = read_table(index.read_bytes())
    forged = [
        (key, encode_entry(replace(decode_entry(value), size=8)) if key == b"b" else value)
        for key, value in entries
    ]
    index.write_bytes(build_table(forged))
    result = run("verify", str(tmp_path / "m-1"))
    assert result.returncode == 1
    assert "DAMAGED" in result.stdout
    line = one_error_line(result)
    assert "m-1.index" in line
    assert "'b'" in line
    doc = json.loads(run("verify", str(tmp_path), "--json").stdout)
    assert doc["ok"] is False
    assert len(doc["checkpoints"]) == 2
    assert [bool(c["problems"]) for c in doc["checkpoints"]] == [True, False]


def test_verify_of_a_directory_checks_every_checkpoint(run_dir: Path) -> None:
    result = run("verify", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 checkpoints ok" in result.stdout
    # The leftovers of the interrupted save are pointed out, not counted as damage.
    assert "data file without its index" in result.stderr


def test_verify_of_an_empty_directory_exits_3(tmp_path: Path) -> None:
    result = run("verify", str(tmp_path))
    assert result.returncode == 3
    assert "no checkpoints" in one_error_line(result)


# -- convert and diff ----------------------------------------------------------------------------


def test_convert_then_diff(tmp_path: Path) -> None:
    src = str(FIXTURES / "v2_dtypes")
    dst = str(tmp_path / "out" / "model-7")
    result = run("convert", src, dst, "--format", "v2")
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stdout
    same = run("diff", src, dst)
    assert same.returncode == 0, same.stdout
    assert "0 differences" in same.stdout

    again = run("convert", src, dst)
    assert again.returncode == 5
    assert "--force" in one_error_line(again)
    assert run("convert", src, dst, "--force").returncode == 0

    unknown = run("convert", src, str(tmp_path / "x"), "--format", "no-such-format")
    assert unknown.returncode == 4
    assert "no-such-format" in one_error_line(unknown)


def test_diff_names_tensors_and_max_abs_difference() -> None:
    a, b = str(FIXTURES / "tf2_object" / "ckpt-2"), str(FIXTURES / "tf2_object" / "ckpt-4")
    result = run("diff", a, b)
    assert result.returncode == 1
    row = next(line for line in result.stdout.splitlines() if "model/w/" in line)
    assert "max |a-b|" in row
    doc = json.loads(run("diff", a, b, "--json").stdout)
    assert doc["equal"] is False
    kinds = {d["key"]: d for d in doc["differences"]}
    assert kinds["model/step/.ATTRIBUTES/VARIABLE_VALUE"]["max_abs_diff"] == 2.0
    assert kinds["model/blocks/1/label/.ATTRIBUTES/VARIABLE_VALUE"]["kind"] == "values"
    tolerant = run("diff", a, b, "--atol", "100", "--json")
    keys = {d["key"] for d in json.loads(tolerant.stdout)["differences"]}
    assert keys == {"model/blocks/1/label/.ATTRIBUTES/VARIABLE_VALUE"}  # strings still differ


def test_diff_reports_added_removed_and_reshaped(tmp_path: Path) -> None:
    anyckpt.sync.save(tmp_path / "a", {"x": np.zeros(3), "gone": np.ones(1), "s": np.ones((2, 3))})
    anyckpt.sync.save(tmp_path / "b", {"x": np.zeros(3), "new": np.ones(1), "s": np.ones((3, 2))})
    doc = json.loads(run("diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json").stdout)
    kinds = {d["key"]: d["kind"] for d in doc["differences"]}
    assert kinds == {"gone": "only-a", "new": "only-b", "s": "shape"}


# -- prune ---------------------------------------------------------------------------------------


def test_prune_dry_run_explains_then_prune_deletes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with anyckpt.sync.CheckpointManager(root, max_to_keep=None) as manager:
        for step in range(1, 6):
            manager.save({"w": np.full(4, step)}, step=step)
    dry = run("prune", str(root), "--max-to-keep", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for name in ("ckpt-1", "ckpt-2", "ckpt-3"):
        row = next(line for line in dry.stdout.splitlines() if line.split()[:1] == [name])
        assert "DELETE" in row
        assert "beyond max_to_keep=2 (5 tracked)" in row
    assert "dry run: nothing changed; would delete 3 checkpoints" in dry.stdout
    assert sorted(p.name for p in root.glob("*.index")) == [f"ckpt-{i}.index" for i in range(1, 6)]

    real = run("prune", str(root), "--max-to-keep", "2", "--json")
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["deleted"] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert sorted(p.name for p in root.glob("*.index")) == ["ckpt-4.index", "ckpt-5.index"]
    state = anyckpt.sync.get_checkpoint_state(str(root))
    assert state is not None
    assert [Path(p).name for p in state.all_model_checkpoint_paths] == ["ckpt-4", "ckpt-5"]


def test_prune_preserves_with_keep_every_n_hours(tmp_path: Path) -> None:
    root = tmp_path / "run"
    clock = iter(1_000_000.0 + 3600.0 * i for i in range(100))
    with anyckpt.sync.CheckpointManager(root, max_to_keep=None, clock=lambda: next(clock)) as mgr:
        for step in range(1, 5):
            mgr.save({"w": np.full(2, step)}, step=step)
    # Started at t0 (last preserved: t0 - 1), saved at t0 + 1 h, + 2 h, + 3 h, + 4 h. With
    # H = 1.5 the first is too close to t0 - 1, the second is preserved, the third too close
    # to the second: TF's rule, evaluated in order.
    doc = json.loads(
        run(
            "prune", str(root), "--max-to-keep", "1", "--keep-every-n-hours", "1.5", "-n", "--json"
        ).stdout
    )
    actions = {a["name"]: a["action"] for a in doc["actions"]}
    assert actions == {
        "ckpt-1": "delete",
        "ckpt-2": "preserve",
        "ckpt-3": "delete",
        "ckpt-4": "keep",
    }


def test_prune_never_touches_a_saver_directory() -> None:
    result = run("prune", str(FIXTURES / "v2_max_to_keep"), "--max-to-keep", "1", "--dry-run")
    assert result.returncode == 0
    assert "DELETE" not in result.stdout
    assert "would delete 0 checkpoints" in result.stdout


# -- terminal and pipes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("big") / "big-1"
    rng = np.random.default_rng(1)
    anyckpt.sync.save(prefix, {f"t{i}": rng.standard_normal(2**18) for i in range(8)})
    return prefix


def test_progress_bar_on_a_terminal(big_checkpoint: Path) -> None:
    code, output = run_pty("verify", str(big_checkpoint))
    assert code == 0, output
    assert "verifying  [" in output
    assert "\x1b[K" in output  # the bar is redrawn in place and erased
    assert "/16.0 MiB" in output  # bytes done of the total
    assert "B/s" in output  # rate
    assert "ETA" in output
    assert "ok       " in output


def test_no_progress_bar_or_ansi_when_piped(big_checkpoint: Path, tmp_path: Path) -> None:
    converted = str(tmp_path / "converted-1")
    for args in (["verify", str(big_checkpoint)], ["convert", str(big_checkpoint), converted]):
        result = run(*args)
        assert not ANSI.search(result.stdout + result.stderr), args
        assert "verifying  [" not in result.stderr


def test_no_progress_flag_on_a_terminal(big_checkpoint: Path) -> None:
    code, output = run_pty("verify", str(big_checkpoint), "--no-progress")
    assert code == 0
    assert "\x1b[" not in output


# -- remote storage ------------------------------------------------------------------------------


def test_s3_with_storage_options(s3_bucket: Any) -> None:
    url = f"{s3_bucket.url}/run"
    with anyckpt.sync.CheckpointManager(
        url, max_to_keep=2, storage_options=s3_bucket.storage_options
    ) as manager:
        for step in (1, 2, 3):
            manager.save({"w": np.full(8, step, np.float32)}, step=step)
    options: list[str] = []
    for key, value in s3_bucket.storage_options.items():
        options += ["-o", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    listing = run("ls", url, "--json", *options)
    assert listing.returncode == 0, listing.stderr
    assert [c["name"] for c in json.loads(listing.stdout)["checkpoints"]] == ["ckpt-2", "ckpt-3"]
    verified = run("verify", url, *options)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "2 of 2 checkpoints ok" in verified.stdout


def test_inspect_json_streamed_text_is_what_json_dump_writes(tmp_path: Path) -> None:
    """The tensors of ``inspect --json`` are written one entry at a time; the text is exactly
    the indented document ``json.dump`` writes (so nothing downstream sees a difference),
    including names that need escaping and an empty listing."""
    import io

    from anyckpt.cli._output import print_json

    prefix = tmp_path / "c"
    tensors = {'a"b\\nc': np.arange(3, dtype=np.int32), "é/x": np.zeros((2, 2), np.float16)}
    anyckpt.sync.save(str(prefix), tensors, durable=False)
    result = subprocess.run(
        [sys.executable, "-m", "anyckpt", "inspect", "--json", str(prefix)],
        capture_output=True,
        text=True,
        check=True,
    )
    document = json.loads(result.stdout)
    assert [t["key"] for t in document["tensors"]] == sorted(tensors)
    assert result.stdout == json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    for items in ([], [{"k": 1}], [{"k": [1, {"n": "x\ny"}]}, 2, "s"]):
        streamed, whole = io.StringIO(), io.StringIO()
        print_json({"a": 1, "tensors": None, "z": [3]}, streamed, streamed=("tensors", iter(items)))
        print_json({"a": 1, "tensors": items, "z": [3]}, whole)
        assert streamed.getvalue() == whole.getvalue()
